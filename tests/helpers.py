"""What the tests share: generated IDX datasets, real launches of the job, checks on what a run
leaves behind, and where the tool virtualenvs are.

The one module tests import helpers from (fixtures live in conftest.py). Probes and tools may
import it too; it imports nothing from the tests, the probes or the tools.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from job.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
    # A process group started in pytest's own process (a single-process run: job.loopback) sets
    # these in os.environ; inherited, they would bind a multi-host test's gloo to loopback.
    "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
)  # fmt: skip
# The Makefile's K8S_VENV (kubectl, the schema validator, the Kubeflow models) and LINT_VENV (checkov).
K8S_BIN = REPO / ".venv-k8s" / "bin"
LINT_BIN = REPO / ".venv-lint" / "bin"
# The Makefile's MLFLOW_VENV: the MLflow server (the mlflow_venv fixture builds it).
MLFLOW_BIN = REPO / ".venv-mlflow" / "bin"

TINY_TRAIN, TINY_TEST = 512, 203  # 203 splits unevenly over 2 and 3 ranks: padding would show


# --- generated data ---------------------------------------------------------------------------


def write_idx(path: Path, array: torch.Tensor) -> None:
    """An IDX file of unsigned bytes, as MNIST's raw files are laid out."""
    header = (0x0800 | array.dim()).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.to(torch.uint8).contiguous().numpy().tobytes())


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: class k is a bright 6x6 block at a class-specific place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 28, 28), generator=g)
    for i, k in enumerate(labels.tolist()):
        row, col = 3 + 7 * (k // 4), 3 + 6 * (k % 4)
        images[i, row : row + 6, col : col + 6] = 255
    return images.to(torch.uint8), labels.to(torch.uint8)


def make_tiny_mnist(root: Path, train: int = TINY_TRAIN, test: int = TINY_TEST) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def tiny_overrides(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides that point the job at generated data (no checksum, no download) and a run dir."""
    return [
        f"data.root={root}",
        "data.verify=false",
        "data.download=false",
        "data.test_batch_size=50",
        f"run.dir={run_dir}",
        "train.epochs=2",
        "optim.lr=0.05",  # the generated digits are learned in 16 steps at this rate
        *extra,
    ]


def write_random_model(folder: Path, seed: int) -> Path:
    """`folder` with model.pt of a net with random weights and the same weights in a file shaped
    like a training checkpoint (for commands that accept either)."""
    from job.model import Net

    torch.manual_seed(seed)
    state = Net().state_dict()
    torch.save(state, RunDir(folder).model)
    torch.save({"model": state, "optimizer": {}, "epochs_done": 1}, folder / "step-000000938.pt")
    return folder


# --- launching the job ------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without launcher variables, so a test decides how the job is launched."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    # A process killed by a fatal signal (SIGABRT, SIGSEGV) prints every thread's Python stack:
    # the one clue a rare crash under load leaves in a test's output (tests/README.md, flaky tests).
    env["PYTHONFAULTHANDLER"] = "1"
    env.update(extra)
    return env


def _torchrun(nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc)]


def run_job(
    args: list[str],
    nproc: int | None = None,
    launcher: str = "torchrun",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """`python -m job ARGS`, alone (nproc None) or under a real launcher with nproc processes."""
    if nproc is None:
        cmd = [sys.executable, "-m", "job", *args]
    elif launcher == "torchrun":
        cmd = [*_torchrun(nproc), "-m", "job", *args]
    elif launcher == "job.launch":  # the exit-code-aware torchrun every make target and cluster uses
        cmd = [sys.executable, "-m", "job.launch", *_torchrun(nproc)[1:], "-m", "job", *args]
    elif launcher == "accelerate":
        cmd = [
            str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "job", *args,
        ]  # fmt: skip
    else:
        raise ValueError(launcher)
    return subprocess.run(cmd, cwd=cwd or REPO, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)


def run_probe(name: str, args: list[str], nproc: int) -> subprocess.CompletedProcess[str]:
    """A script from tests/probes/ under torchrun: for checks that need to look inside the ranks."""
    cmd = [*_torchrun(nproc), str(REPO / "tests/probes" / name), *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)


def run_main(
    capfd: pytest.CaptureFixture[str],
    args: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`python -m job ARGS` called in this process (job.__main__.exit_code): its exit code and what
    it printed (capfd), as run_job returns them, without a process start and a torch import.

    For bad input and checks that fail before a process group starts; a path that starts one, or
    ends the process (job.process_exit), stays a run_job. The call sees os.environ = `env`
    (clean_env() unless given) and works in `cwd`; afterwards whatever the job set in this process
    is put back: os.environ, the working directory, torch's numerics switches and threads, the
    "job" logger, SIGINT's handler. A call still running after `timeout` s (a read blocked on a
    FIFO) is interrupted with TimeoutError. A call that would start a process group or its store
    fails the test at once (in this process it could wait for peers that never come, and its
    deadline ends the process with os._exit), as does one that left SIGTERM blocked: such a path
    belongs in a subprocess."""
    import torch.distributed as dist

    from job.__main__ import exit_code

    env = clean_env() if env is None else env
    if "TORCHELASTIC_RUN_ID" in env:  # the job would watch, and signal, this process's parent
        raise ValueError("an elastic agent's environment: use run_job")
    saved_env, saved_cwd, saved_numerics = dict(os.environ), os.getcwd(), _numerics()
    logger = logging.getLogger("job")
    saved_logger = (list(logger.handlers), logger.level, logger.propagate)
    sigint = signal.getsignal(signal.SIGINT)

    def too_long(*_: object) -> None:
        raise TimeoutError(f"python -m job {' '.join(args)} still ran after {timeout} s")

    def no_group(*_: object, **__: object) -> None:
        raise AssertionError(f"python -m job {' '.join(args)} starts a process group: test it with run_job")

    alarm = signal.signal(signal.SIGALRM, too_long)
    group_starts = dist.init_process_group, dist.TCPStore
    dist.init_process_group = dist.TCPStore = no_group
    capfd.readouterr()
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd or REPO)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        code = exit_code(args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
        dist.init_process_group, dist.TCPStore = group_starts
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        _set_numerics(saved_numerics)
        logger.handlers[:], logger.propagate = saved_logger[0], saved_logger[2]
        logger.setLevel(saved_logger[1])
        signal.signal(signal.SIGINT, sigint)
    out, err = capfd.readouterr()
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, []), "the call left SIGTERM blocked"
    return subprocess.CompletedProcess(["python", "-m", "job", *args], code, out, err)


def _numerics() -> tuple:
    """What job.seeding.configure_numerics and job.process_group set in the process."""
    return (
        torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
        torch.get_num_threads(),
    )  # fmt: skip


def _set_numerics(saved: tuple) -> None:
    deterministic, warn_only, fill, matmul_tf32, cudnn_tf32, cudnn_deterministic, benchmark, threads = saved
    if _numerics()[:2] != (deterministic, warn_only):  # the call imports torch._inductor (seconds)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, benchmark
    torch.set_num_threads(threads)


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it at once, as a lost node or a killed container
    does. (torchrun starts each worker in its own session: killing its process group is not enough.)"""
    launcher = psutil.Process(pid)
    processes = [launcher, *launcher.children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)


# --- what a run leaves behind -----------------------------------------------------------------


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Bad input: non-zero exit, exactly one 'error:' line naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_summary(run_dir: Path) -> dict:
    return json.loads(RunDir(run_dir).summary.read_text())


def checkpoint(run_dir: Path, step: int) -> Path:
    return RunDir(run_dir).checkpoints.path_for(step)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints in `run_dir` now (unordered; none yet: [])."""
    checkpoints = RunDir(run_dir).checkpoints
    return [checkpoints.step_of(p) for p in checkpoints.files()]


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    ours, theirs = load_state(RunDir(run_dir).model), load_state(RunDir(reference).model)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "weights differ from the uninterrupted run"


def weights_digest(run_dir: Path) -> str:
    """sha256 over model.pt's tensors (names, shapes, bytes) in name order: the bits of a run's
    weights, independent of how torch.save lays out its zip."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_state(RunDir(run_dir).model).items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """`path` (created) with a tmpfs of `size` mounted on it for the block (root; skip where it
    cannot be mounted): a small volume a test fills to make writes fail with ENOSPC."""
    path.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"root cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with its sha256: what 'left as it was' means."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(directory.rglob("*"))
    }


# --- the tool virtualenvs ---------------------------------------------------------------------


def tool(venv_bin: Path, name: str) -> str:
    """A program from .venv-k8s or .venv-lint (the k8s_venv and lint_venv fixtures build them)."""
    path = venv_bin / name
    if not path.exists():
        pytest.fail(f"{path} is missing: `make {venv_bin.parent.name}/.installed` installs it", pytrace=False)
    return str(path)


# --- an MLflow tracking server ----------------------------------------------------------------


class MlflowServer:
    """`mlflow server` on 127.0.0.1 at a free port, its runs in a SQLite file and its artifacts in a
    folder under `root`; telemetry off, and without the GenAI job runner (five huey processes).
    Started again on the same port and files after a kill, it serves the same runs."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.process = root, None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        cmd = [
            tool(MLFLOW_BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        env = clean_env(MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.root / "server.log", "a") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited {self.process.returncode}:\n{self.log()}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"mlflow server did not answer within 120 s:\n{self.log()}", pytrace=False)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server and its workers (its own session), and wait until they are gone."""
        if self.process is None or self.process.poll() is not None:
            return
        processes = [psutil.Process(self.process.pid)]
        processes += processes[0].children(recursive=True)
        os.killpg(self.process.pid, sig)
        _, alive = psutil.wait_procs(processes, timeout=30)
        for process in alive:
            process.kill()
        self.process.wait()

    def log(self) -> str:
        return (self.root / "server.log").read_text()

    def client(self):  # noqa: ANN201 (mlflow is imported only by the tests that use a server)
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def mlflow_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:  # noqa: ANN001
    """Each metric the job sends (job.tracking.METRICS): its (step, value) points as the server
    holds them, duplicates kept, by step."""
    from job.tracking import METRICS

    keys = [key for fields in METRICS.values() for key in fields.values()]
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def metrics_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The same from a run directory's metrics.jsonl: what its MLflow run must mirror."""
    from job.tracking import METRICS

    history: dict[str, list[tuple[int, float]]] = {key: [] for fields in METRICS.values() for key in fields.values()}
    for line in RunDir(run_dir).metrics.read_text().splitlines():
        event = json.loads(line)
        for field, key in METRICS.get(event["event"], {}).items():
            history[key].append((event["step"], float(event[field])))
    return {key: sorted(points) for key, points in history.items()}
