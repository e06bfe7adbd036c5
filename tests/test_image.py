"""The image, built from docker/Dockerfile and run as a cluster runs it: read-only, non-root, no network.

Registries cannot be pulled here, so the base is Debian bookworm from debootstrap, standing in
for debian:bookworm-slim and pinned by its digest as that one is; the locked wheels come from this
machine (`pip download` of docker/requirements.lock, hashes checked) through a local wheelhouse
instead of GBs from PyPI: the same Dockerfile, the same pins, the CUDA build of torch (which runs
on the CPU when there is no GPU).

Needs root with buildah, podman, runc and debootstrap (`.ci/run` installs them), about 15 GB
of free disk (docker/README.md) and 7 GB of free RAM while it builds. `make image-test` runs
it; `make test` leaves it out (marker `image`). Every piece of container state lives under one
temporary root, removed at the end.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_ok, load_state, read_summary, run_job

from job.run_dir import RunDir

pytestmark = [pytest.mark.image, pytest.mark.processes]

TOOLS = ("buildah", "podman", "runc", "debootstrap")
IMAGE = "localhost/mnist-ddp:image-test"
BASE = "localhost/debian:bookworm-debootstrap"
UID = 10001  # the Dockerfile's user
ONE_EPOCH_ACCURACY = 0.93  # the seed recipe after its first epoch: 93.57% at 2 ranks (docs/RESULTS.md)
WHEELHOUSE = REPO / "build" / "wheelhouse"  # kept between runs: pip skips the wheels already there
COMMIT_TMPFS = "8g"  # twice the compressed image layer (3.1 GB), with room to spare


class Containers:
    """buildah and podman, both on a private storage root: the machine's default store is never touched."""

    def __init__(self, root: Path):
        self.root = root
        # A commit writes the new layer (GBs) twice as temporary blobs before storing it:
        # in RAM, compressed (see `image`), they cost no disk at the build's peak.
        (root / "tmp").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={COMMIT_TMPFS}", "tmpfs", str(root / "tmp")], check=True)
        self.env = {**os.environ, "TMPDIR": str(root / "tmp")}
        self.storage = ["--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "overlay"]

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # cgroupfs and runc: no systemd and no crun here.
        command = ["podman", *self.storage, "--cgroup-manager", "cgroupfs", "--runtime", "runc", *args]
        return self.run(command, check=check)

    def run_job(self, name: str, runs: Path, *command: str) -> subprocess.CompletedProcess:
        """Run the image as a cluster would: read-only root, only /tmp and the run directory writable, no network.

        Explicit ulimits: podman's defaults exceed this host's hard limits.
        """
        return self.podman(
            "run", "--name", name, "--network", "none", "--read-only", "--read-only-tmpfs=false",
            "--tmpfs", "/tmp:rw,size=1g", "--cap-drop", "all", "--security-opt", "no-new-privileges",
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
            "--volume", f"{runs}:/app/runs", IMAGE, *command,
        )  # fmt: skip

    def run(self, command: list[str], check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env)
        if check and result.returncode != 0:
            output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            pytest.fail(f"{' '.join(command[:8])} ... failed ({result.returncode}):\n{output}")
        return result

    def remove_all(self) -> None:
        self.run(["podman", *self.storage, "rm", "--all", "--force"], check=False)
        self.run(["buildah", *self.storage, "rm", "--all"], check=False)
        self.run(["podman", *self.storage, "rmi", "--all", "--force"], check=False)
        for mount in reversed(_mounts_under(self.root)):  # whatever a crash left mounted
            subprocess.run(["umount", "--lazy", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _project() -> dict:
    import tomllib  # Python 3.11+, as this test needs anyway (the image's Python); `make test` runs on 3.10 too

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(root))]


@pytest.fixture(scope="module")
def containers() -> Iterator[Containers]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(f"the image test needs root and {', '.join(TOOLS)} (missing: {', '.join(missing) or 'root'}); "
                    "run .ci/run or: apt-get install buildah podman runc debootstrap")  # fmt: skip
    # Beside the other temporary files of this machine; a crash leaves it named for what it is.
    state = Containers(Path(tempfile.mkdtemp(prefix="mnist-ddp-image-test-", dir="/var/tmp")))
    try:
        yield state
    finally:
        state.remove_all()


@pytest.fixture(scope="module")
def base_image(containers: Containers) -> str:
    """Debian bookworm (minbase) from debootstrap, imported as an image: the stand-in for debian:bookworm-slim."""
    rootfs = containers.root / "rootfs"
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    podman_import = ["podman", *containers.storage, "import", "--quiet", "-", BASE]
    imported = subprocess.run(podman_import, stdin=tar.stdout, capture_output=True, text=True)
    tar.wait()
    assert imported.returncode == 0 and tar.returncode == 0, imported.stderr
    shutil.rmtree(rootfs)
    # By digest, as the Dockerfile's default base is: the build must resolve that form.
    return f"{BASE}@{containers.podman('image', 'inspect', '--format', '{{.Digest}}', BASE).stdout.strip()}"


@pytest.fixture(scope="module")
def wheelhouse_url() -> Iterator[str]:
    """The locked wheels for the image's Python (3.11, the host's platform), served on loopback."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--dest", str(WHEELHOUSE),
         "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
         "--require-hashes", "-r", str(REPO / "docker" / "requirements.lock")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(WHEELHOUSE)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def image(containers: Containers, base_image: str, wheelhouse_url: str) -> str:
    """Built by `make image` itself, with buildah on the private root."""
    name, tag = IMAGE.split(":")
    # chroot isolation and the host network: no daemon and no network namespaces for builds
    # here. Compressed layers: the commit's temporary blobs (on tmpfs) take half the RAM.
    build_args = (
        f"--isolation chroot --network host --disable-compression=false "
        f"--build-arg BASE_IMAGE={base_image} --build-arg WHEELS={wheelhouse_url}"
    )
    start = time.monotonic()
    command = ["make", "--no-print-directory", "image", f"CONTAINER_TOOL=buildah {' '.join(containers.storage)}",
               f"IMAGE={name}", f"TAG={tag}", f"IMAGE_BUILD_ARGS={build_args}"]  # fmt: skip
    containers.run(command)
    size = int(containers.podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\nbuilt {IMAGE} in {time.monotonic() - start:.0f} s: {size / 1e9:.2f} GB")
    return IMAGE


@pytest.fixture
def runs(containers: Containers, image: str) -> Path:
    """The one writable mount: a run directory on the host that the image's user owns."""
    path = Path(tempfile.mkdtemp(dir=containers.root, prefix="runs-"))
    os.chown(path, UID, UID)
    return path


def test_the_image_declares_its_user_entrypoint_and_labels(containers: Containers, image: str):
    config = json.loads(containers.podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--"]
    assert config["Cmd"] == ["python", "-m", "job", "train"]
    assert "PYTHONUNBUFFERED=1" in config["Env"]
    labels = config["Labels"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.title"] == "mnist-ddp"
    assert labels["org.opencontainers.image.revision"] == head
    assert labels["org.opencontainers.image.version"] == _project()["version"]


def test_the_image_runs_as_its_non_root_user(containers: Containers, runs: Path):
    assert containers.run_job("whoami", runs, "id").stdout.startswith(f"uid={UID}(job) gid={UID}(job) ")


def test_the_image_has_no_installer(containers: Containers, runs: Path):
    """pip, setuptools and python3-venv are gone from the RUN that used them: nothing in the image can
    fetch and install code."""
    probe = "import importlib.util as u; print([m for m in ('pip', 'setuptools', 'wheel') if u.find_spec(m)])"
    assert containers.run_job("installers", runs, "python", "-c", probe).stdout.strip() == "[]"
    assert containers.run_job("no-pip", runs, "sh", "-c", "ls /opt/venv/bin").stdout.split().count("pip") == 0
    packages = containers.run_job("packages", runs, "dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\\n")
    installed = {line.split()[0] for line in packages.stdout.splitlines() if line.endswith(" installed")}
    assert {"python3", "tini"} <= installed and not installed & {"python3-venv", "python3-pip-whl", "ca-certificates"}


def test_the_image_holds_the_pinned_cuda_torch(containers: Containers, runs: Path):
    probe = "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda)"
    versions = containers.run_job("versions", runs, "python", "-c", probe).stdout.split()
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    # PyPI's Linux wheels are the CUDA builds: 2.14.1+cu130 is what `torch==2.14.1` installs.
    assert [v.split("+")[0] for v in versions[:2]] == [pins["torch"], pins["torchvision"]]
    assert versions[2] != "None", "the image must carry CUDA-enabled torch"


def test_train_and_evaluate_read_only_without_network_on_two_processes(
    containers: Containers, runs: Path, tmp_path: Path
):
    # One epoch of the seed recipe on all of MNIST (about 10 s of training on 2 CPU processes).
    config = ["--config", "job/configs/smoke.yaml", "data.train_limit=null"]
    torchrun = ["torchrun", "--standalone", "--nproc-per-node", "2"]
    # data.download=false: the baked MNIST must be there; there is no network to fetch it anyway.
    containers.run_job("train", runs, *torchrun, "-m", "job", "train", *config, "data.download=false")
    summary = read_summary(runs / "smoke")
    assert summary["world_size"] == 2 and summary["global_step"] == 938
    assert summary["test_accuracy"] >= ONE_EPOCH_ACCURACY, summary

    evaluated = containers.run_job(
        "evaluate", runs, "python", "-m", "job", "evaluate", "--checkpoint", "runs/smoke/model.pt", *config
    )
    figures = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert figures["test_accuracy"] == summary["test_accuracy"], "exact evaluation: same weights, same figure"

    # Nothing was written into the container's own filesystem (it was read-only; this proves it):
    # its diff is what the runtime itself leaves (the mount points of /etc/hosts and friends)...
    containers.run_job("baseline", runs, "true")
    baseline = containers.podman("diff", "baseline").stdout
    for name in ("train", "evaluate"):
        assert containers.podman("diff", name).stdout == baseline
    # ...and in the mounted run directory only the run's files, all the image user's.
    assert [p.name for p in runs.iterdir()] == ["smoke"]
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in runs.rglob("*")}
    assert owners == {(UID, UID)}
    assert {"config.yaml", "summary.json", "metrics.jsonl", "model.pt", "checkpoints", "tb"} <= {
        p.name for p in (runs / "smoke").iterdir()
    }

    # The same run from .venv on this host: the same pins and the same world size give the same bits.
    local = run_job(["train", *config, f"run.dir={tmp_path / 'local'}"], nproc=2, timeout=600)
    assert_ok(local)
    in_image, on_host = load_state(RunDir(runs / "smoke").model), load_state(RunDir(tmp_path / "local").model)
    assert in_image.keys() == on_host.keys()
    assert all(torch.equal(in_image[k], on_host[k]) for k in in_image), "the image must compute what .venv computes"
