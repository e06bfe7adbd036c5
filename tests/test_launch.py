"""job.launch: torchrun that never retries bad input and exits with its workers' verdict.

Real torchrun agents and worker processes; the workers are tiny scripts that exit with the
code a test asks for, so what is measured is the launcher, not the job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import REPO, assert_one_line_error, clean_env, kill_tree, tiny_overrides

from job.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED
from job.launch import exit_code

WORKER = """
import os, pathlib, signal, sys, time
code = int(sys.argv[1])
with open("starts", "a") as f:  # which round of the group this worker belongs to
    f.write(os.environ["TORCHELASTIC_RESTART_COUNT"] + "\\n")
if code == -6:  # as NCCL's watchdog ends a process whose collective timed out
    os.abort()
if code == -15:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
    pathlib.Path(sys.argv[2]).touch()
    time.sleep(60)
sys.exit(code)
"""


def launch(tmp_path: Path, *worker_args: str, launcher: bool = True, max_restarts: int = 0) -> subprocess.Popen[str]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun = [sys.executable, "-m", "job.launch"] if launcher else [str(Path(sys.executable).parent / "torchrun")]
    cmd = [
        *torchrun, "--standalone", "--nproc-per-node", "2", "--max-restarts", str(max_restarts),
        "--monitor-interval", "0.1", str(worker), *worker_args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),  # pytorch#135712
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def rounds(tmp_path: Path) -> int:
    """How many times the group was started. Counted per round, not per worker: when one worker
    fails at once, the agent may stop the other before it has written anything."""
    return len(set((tmp_path / "starts").read_text().split()))


@pytest.mark.processes
def test_torchrun_itself_exits_1_when_its_workers_exit_75(tmp_path):
    """Why the launcher exists: torchrun hides its workers' codes."""
    assert launch(tmp_path, str(EXIT_PREEMPTED), launcher=False).wait(timeout=120) == EXIT_FAILED


@pytest.mark.processes
@pytest.mark.parametrize("code", [EXIT_PREEMPTED, EXIT_BAD_INPUT])
def test_the_launcher_exits_with_the_workers_code(tmp_path, code):
    assert launch(tmp_path, str(code)).wait(timeout=120) == code


@pytest.mark.processes
def test_the_launcher_never_restarts_after_bad_input(tmp_path):
    """Plain torchrun --max-restarts 3 would start the group 4 times for a config error."""
    assert launch(tmp_path, str(EXIT_BAD_INPUT), max_restarts=3).wait(timeout=120) == EXIT_BAD_INPUT
    assert rounds(tmp_path) == 1


@pytest.mark.processes
def test_workers_stopped_by_a_peers_preemption_are_restarted_to_rejoin(tmp_path):
    """75 without a SIGTERM to this launcher: another host was preempted, and its replacement
    joins the restarted group (the Kubernetes pod-preemption case)."""
    assert launch(tmp_path, str(EXIT_PREEMPTED), max_restarts=1).wait(timeout=120) == EXIT_PREEMPTED
    assert rounds(tmp_path) == 2


@pytest.mark.processes
def test_the_launcher_still_restarts_after_a_run_time_failure(tmp_path):
    assert launch(tmp_path, str(EXIT_FAILED), max_restarts=2).wait(timeout=120) == EXIT_FAILED
    assert rounds(tmp_path) == 3  # the first start and two restarts


@pytest.mark.processes
def test_a_worker_aborted_by_the_nccl_watchdog_is_a_run_time_failure_that_is_retried(tmp_path):
    """TORCH_NCCL_ASYNC_ERROR_HANDLING's default aborts the process (SIGABRT) on a collective
    timeout, so the job's own one-line lost-peer error never prints: the launcher still reads it
    as a failure a restart may fix (exit 1; a Job's podFailurePolicy counts it, Slurm's torchrun retries)."""
    assert launch(tmp_path, "-6", max_restarts=1).wait(timeout=120) == EXIT_FAILED
    assert rounds(tmp_path) == 2


@pytest.mark.processes
def test_the_launcher_exits_75_when_sigterm_stops_torchrun(tmp_path):
    ready = tmp_path / "ready"
    process = launch(tmp_path, "-15", str(ready))
    deadline = time.monotonic() + 60
    while not ready.exists():  # a worker has its SIGTERM handler
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == EXIT_PREEMPTED


MASKED_STOP = """
import os, signal, sys, types
import job.launch as launch
import torch.distributed.run
from torch.distributed.elastic.metrics import api as metrics
from torch.distributed.elastic.multiprocessing import api
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

def clock_hit_by_sigterm():
    # SIGTERM lands between the timing wrapper's `try:` and `start = time.time()`.
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(10**7):  # the handler runs (and raises) at the loop's next check
        pass
    sys.exit("the SIGTERM handler never ran")

metrics.time = types.SimpleNamespace(time=clock_hit_by_sigterm)

@metrics.prof
def monitor_workers():
    return "unreached"

seen = []
sys.argv[1:] = ["--standalone", "train.py"]

def torchrun(args=None):
    signal.signal(signal.SIGTERM, api._terminate_process_handler)  # as the agent's PContext.start does
    try:
        monitor_workers()
    except BaseException as e:
        seen.append(f"{type(e).__name__} from {type(e.__context__).__name__}")
        raise

torch.distributed.run.main = torchrun
code = launch.main()
closed = []
still_open = DynamicRendezvousHandler.shutdown(types.SimpleNamespace(_close=lambda: closed.append(1)))
print(seen[0], code, still_open, closed == [], sep=",")
"""


@pytest.mark.processes
def test_a_sigterm_that_torchs_timing_wrapper_masks_is_still_a_stop(tmp_path):
    """torch's `prof` wrapper turns a SignalException raised before `start` is bound into its own
    UnboundLocalError (seen in make k8s-local-test: a preempted pod exited 1 and closed the
    rendezvous, so the surviving pod failed too). The launcher must still exit 75 and leave the
    rendezvous open for the other nodes, as torch does for an unmasked SignalException."""
    script = tmp_path / "masked_stop.py"
    script.write_text(MASKED_STOP)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    masked, code, still_open, nothing_closed = result.stdout.strip().split(",")
    assert masked == "UnboundLocalError from SignalException", "torch no longer masks it: " + result.stderr
    assert (int(code), still_open, nothing_closed) == (EXIT_PREEMPTED, "True", "True"), result.stderr


def test_the_launcher_maps_mixed_codes_to_the_most_telling_one():
    assert exit_code({EXIT_BAD_INPUT, EXIT_FAILED}) == EXIT_BAD_INPUT
    assert exit_code({EXIT_PREEMPTED, -9}) == EXIT_FAILED
    assert exit_code({EXIT_PREEMPTED, -15}) == EXIT_PREEMPTED, "a peer the agent stopped before it trained"
    assert exit_code({-15}) == EXIT_FAILED
    assert exit_code({EXIT_FAILED}) == EXIT_FAILED


@pytest.mark.processes
def test_bad_input_found_by_the_workers_is_one_line_and_never_retried(tiny_root, tmp_path):
    """What `make train-local` runs: job.launch --max-restarts 3. Plain torchrun printed the
    error four times over ~50 s and exited 1; retrying cannot fix bad input. One real job run:
    every error a rank finds in the process group stops every rank the same way (job/collectives.py,
    on_some_ranks), here rank 0's missing data; the launcher's own rules are pinned above with
    workers that exit with the code asked for."""
    run_dir = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    args, needle = tiny_overrides(tmp_path / "empty", run_dir), "MNIST files missing"
    env = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    launch = [sys.executable, "-m", "job.launch", "--standalone", "--nproc-per-node", "2", "--max-restarts", "3"]
    result = subprocess.run([*launch, "-m", "job", "train", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == EXIT_BAD_INPUT
    assert_one_line_error(result, needle)
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


EXIT_AFTER_HOST = """
import os, sys, time
while True:  # until the node hosting the rendezvous store has exited, store and all
    try:
        os.kill(int(os.environ["STORE_HOST_PID"]), 0)
    except ProcessLookupError:
        break
    time.sleep(0.05)
time.sleep(1)  # this node's agent polls the store (every --monitor-interval) meanwhile
sys.exit(2)
"""


@pytest.mark.processes
def test_a_node_whose_workers_exit_2_after_the_store_host_left_still_exits_2(tmp_path):
    """Two nodes at a c10d rendezvous whose workers all exit 2 (bad input every rank sees, as
    job/same_run.py's check): the host node's launcher exits first and takes the store with it.
    The other node's agent then polled a store that no longer answered and exited 1 (a run-time
    failure a scheduler retries; 1 in 7 two-node runs of test_same_run.py); it must exit 2."""
    port = free_port()
    worker = tmp_path / "worker.py"
    worker.write_text("import sys\nsys.exit(2)\n")
    (tmp_path / "late.py").write_text(EXIT_AFTER_HOST)
    nodes = []
    for node, script in enumerate((worker, tmp_path / "late.py")):
        cmd = [
            sys.executable, "-m", "job.launch", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "host-left", "--rdzv-conf", f"is_host={1 - node}",
            "--max-restarts", "3", "--monitor-interval", "0.1", str(script),
        ]  # fmt: skip
        env = clean_env(PYTHONPATH=str(REPO), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
        if node == 1:
            env["STORE_HOST_PID"] = str(nodes[0].pid)
        nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    codes = [node.wait(timeout=120) for node in nodes]
    assert codes == [EXIT_BAD_INPUT, EXIT_BAD_INPUT], nodes[1].stderr.read().decode()[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLEEPER = """
import os, pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
pathlib.Path(f"started-{os.environ['GROUP_RANK']}-{os.getpid()}").touch()
if os.environ["GROUP_RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and len(sys.argv) > 1:
    time.sleep(float(sys.argv[1]))  # after the store's host froze: this node's worker fails
    sys.exit(1)
time.sleep(300)
"""


@pytest.mark.processes
@pytest.mark.parametrize(
    ("case", "worker_args", "max_restarts"),
    [
        pytest.param("polling", [], 0, id="agent-polling-the-store"),  # `num_nodes_waiting` between looks
        pytest.param("restarting", ["4"], 1, id="agent-rejoining-after-a-failure"),  # the rendezvous's join
        pytest.param("closing", ["4"], 0, id="agent-closing-the-rendezvous"),  # `shutdown` after the last failure
    ],
)
def test_a_node_whose_rendezvous_store_host_froze_stops_within_a_bound(
    tmp_path: Path, case: str, worker_args: list[str], max_restarts: int
) -> None:
    """Two nodes at a c10d rendezvous on loopback; the node hosting the store is frozen (SIGSTOP of
    its agent, as a hung or cut-off host), its workers alive. A TCPStore call to it never returned,
    whatever its timeout, so the other node's agent waited forever, whether it was polling the store,
    rejoining after its worker failed, or closing the rendezvous. With read_timeout=5 it must stop
    its workers and exit 1 within seconds: one `job.launch: error:` line saying the store stopped
    answering (after a worker's own failure, torch's failure report instead), no traceback."""
    port = free_port()
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    nodes = []
    env = clean_env(PYTHONPATH=str(REPO), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    try:
        for node in (0, 1):
            cmd = [
                sys.executable, "-m", "job.launch", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "frozen", "--rdzv-conf",
                f"is_host={1 - node},read_timeout=5", "--max-restarts", str(max_restarts), "--monitor-interval", "0.5",
                "sleeper.py", *worker_args,
            ]  # fmt: skip
            log = (tmp_path / f"node{node}.log").open("w")
            nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + 120
            while node == 0 and not any(  # node 0 first: its agent hosts the store
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for c in psutil.Process(nodes[0].pid).net_connections(kind="tcp")
            ):
                assert time.monotonic() < deadline and nodes[0].poll() is None, (tmp_path / "node0.log").read_text()
                time.sleep(0.05)
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("started-*"))) < 2:
            assert time.monotonic() < deadline and nodes[1].poll() is None, (tmp_path / "node1.log").read_text()
            time.sleep(0.2)
        nodes[0].send_signal(signal.SIGSTOP)
        try:
            code = nodes[1].wait(timeout=120)  # read_timeout + 5 s + STORE_HOST_GONE_GRACE_S, plus a margin for load
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 1 still waits for the frozen store after 120 s ({case})")
        output = (tmp_path / "node1.log").read_text()
        assert code == EXIT_FAILED, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        errors = [line for line in output.splitlines() if line.startswith("job.launch: error: ")]
        if case == "closing":
            assert errors == [], output[-3000:]  # its worker's exit 1 is the failure reported
        else:
            assert len(errors) == 1, output[-3000:]
            assert "the rendezvous store" in errors[0] and "frozen" in errors[0], errors[0]
        assert [pid for pid in started_pids(tmp_path, "1") if running(pid)] == [], "node 1's workers outlived it"
    finally:
        for process in nodes:
            if process.poll() is None:
                kill_tree(process.pid)
        for pid in started_pids(tmp_path, "*"):  # node 0's workers, started in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def started_pids(folder: Path, node: str) -> list[int]:
    return [int(path.name.rsplit("-", 1)[1]) for path in folder.glob(f"started-{node}-*")]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
