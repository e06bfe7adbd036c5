"""Real faults on real processes: SIGKILL of the whole job or of one worker, SIGTERM, a hung
and a dead peer. Each run is killed once a mid-epoch checkpoint exists, and must end with
the bits of the uninterrupted run (or, for a lost peer, end quickly with one clear line).

The data is generated: 3200 samples, 50 steps per epoch, a checkpoint every 10 steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import (
    BIN,
    REPO,
    assert_ok,
    assert_same_weights,
    checkpoint,
    checkpoint_steps,
    clean_env,
    kill_tree,
    make_tiny_mnist,
    run_job,
    tiny_overrides,
)

from job.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED
from job.run_dir import RunDir

STEPS_PER_EPOCH = 50


@pytest.fixture(scope="module")
def medium_root(tmp_path_factory):
    return make_tiny_mnist(tmp_path_factory.mktemp("medium") / "data", train=STEPS_PER_EPOCH * 64)


def train_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", *tiny_overrides(root, run_dir, "checkpoint.every_steps=10", "train.log_interval=5", *extra)]


@pytest.fixture(scope="module")
def reference(medium_root, tmp_path_factory):
    """The uninterrupted 2-rank run, and the 1-process one."""
    runs = {}
    for nproc in (2, None):
        runs[nproc] = tmp_path_factory.mktemp("reference") / "run"
        assert_ok(run_job(train_args(medium_root, runs[nproc]), nproc=nproc))
    return runs


LONGER = "train.epochs=10"
"""10 epochs (500 steps): workers whose launcher is killed cannot finish before their watch notices
(1 s) on a fast machine."""


@pytest.fixture(scope="module")
def longer_reference(medium_root, tmp_path_factory):
    """The uninterrupted 2-rank run of LONGER, trained once for every launcher's test."""
    run_dir = tmp_path_factory.mktemp("longer") / "run"
    assert_ok(run_job(train_args(medium_root, run_dir, LONGER), nproc=2))
    return run_dir


def torchrun(nproc: int, *flags: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), *flags, "-m", "job"]


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A job in its own session, output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, env=env or clean_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_checkpoint(run_dir: Path, step: int, procs: list[subprocess.Popen], log: Path) -> None:
    """Until a checkpoint at `step` or later exists (the job still running)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if max(checkpoint_steps(run_dir), default=0) >= step:
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"the job ended before step {step}:\n{log.read_text()}")
        time.sleep(0.02)
    pytest.fail(f"no checkpoint at step {step} within 240 s:\n{log.read_text()}")


def resumed_step(output: str) -> int:
    match = re.search(r"Resuming from \S+step-(\d+)\.pt", output)
    assert match, output
    return int(match.group(1))


@pytest.mark.processes
def test_a_killed_job_started_again_ends_with_the_uninterrupted_bits(medium_root, reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    job = start([*torchrun(2), *train_args(medium_root, run_dir)], log)
    wait_for_checkpoint(run_dir, 20, [job], log)
    kill_tree(job.pid)  # the node is gone: launcher and workers at once
    job.wait()

    again = run_job(train_args(medium_root, run_dir), nproc=2)
    assert_ok(again)
    assert 20 <= resumed_step(again.stdout) < 2 * STEPS_PER_EPOCH, "resumed mid-run, not after an orphan finished it"
    assert_same_weights(run_dir, reference[2])


@contextlib.contextmanager
def adopting_orphans():
    """While inside, processes orphaned below this one are re-parented to it (Linux's
    PR_SET_CHILD_SUBREAPER), so the test can wait for them and read their exit codes."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def wait_for_adopted(pids: list[int], timeout: float) -> dict[int, int]:
    """The exit codes of adopted orphans (negative: killed by that signal), once all have exited."""
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in set(pids) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    for pid in set(pids) - set(codes):  # still running: end them, so nothing outlives the test
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return codes


LAUNCHERS = {
    "job.launch": [sys.executable, "-m", "job.launch", "--standalone", "--nproc-per-node", "2", "-m", "job"],
    "torchrun": torchrun(2),
    "accelerate": [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "job",
    ],
}  # fmt: skip


@pytest.mark.processes
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_workers_whose_launcher_is_killed_stop_with_a_checkpoint_and_resume(
    medium_root, longer_reference, tmp_path, launcher
):
    """Issue 22 case 1: `kill -9` of the launcher's process group (a terminal's kill, the OOM
    killer taking the agent) leaves the workers, each in a session of its own, without a parent.
    They stop as if preempted: a checkpoint, exit 75; the same command again resumes there."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    longer = LONGER
    with adopting_orphans():
        job = start([*LAUNCHERS[launcher], *train_args(medium_root, run_dir, longer)], log)
        wait_for_checkpoint(run_dir, 20, [job], log)
        workers = [p.pid for p in psutil.Process(job.pid).children(recursive=True) if "job" in p.cmdline()]
        assert len(workers) == 2, psutil.Process(job.pid).children(recursive=True)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        codes = wait_for_adopted(workers, timeout=60)
    output = log.read_text()
    assert list(codes.values()) == [EXIT_PREEMPTED] * 2, f"worker exit codes {codes}:\n{output}"
    assert "the launcher (pid" in output and not RunDir(run_dir).model.exists(), output
    # Each worker watches its launcher on its own clock: rank 0 says "by SIGTERM" when its watch
    # fired first, "by another rank's stop request" when rank 1's did; either way one step.
    stopped = r"stopped: by (?:SIGTERM|another rank's stop request) after step (\d+)"
    stops = {int(step) for step in re.findall(stopped, output)}
    assert len(stops) == 1, output
    (step,) = stops
    assert checkpoint(run_dir, step).is_file()

    again = subprocess.run(
        [*LAUNCHERS[launcher], *train_args(medium_root, run_dir, longer)],
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert_ok(again)
    assert resumed_step(again.stdout + again.stderr) == step
    assert_same_weights(run_dir, longer_reference)


@pytest.mark.processes
def test_torchrun_restarts_a_killed_worker_and_the_run_keeps_its_bits(medium_root, reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    env = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    job = start([*torchrun(2, "--max-restarts", "2"), *train_args(medium_root, run_dir)], log, env)
    wait_for_checkpoint(run_dir, 20, [job], log)
    workers = psutil.Process(job.pid).children()
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGKILL)  # OOM killer style: one worker, no warning

    assert job.wait(timeout=300) == 0, log.read_text()
    output = log.read_text()
    assert "restart 1" in output and 20 <= resumed_step(output) < 2 * STEPS_PER_EPOCH
    assert_same_weights(run_dir, reference[2])


@pytest.mark.processes
def test_sigterm_stops_every_rank_after_the_same_step_with_a_checkpoint(medium_root, reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    job = start([*torchrun(2), *train_args(medium_root, run_dir)], log)
    wait_for_checkpoint(run_dir, 20, [job], log)
    signalled = time.monotonic()
    job.send_signal(signal.SIGTERM)  # as the kubelet does: to the container's first process, torchrun
    job.wait(timeout=60)
    assert time.monotonic() - signalled < 30, "SIGTERM must stop the job promptly"

    output = log.read_text()
    stops = {int(step) for step in re.findall(r"\[rank [01]\] SIGTERM: stopping after step (\d+)", output)}
    assert len(stops) == 1, f"all ranks stop after the same step:\n{output}"
    (step,) = stops
    assert output.count(f"SIGTERM: stopping after step {step}") == 2
    assert f"stopped: by SIGTERM after step {step}" in output and "error:" not in output
    assert checkpoint(run_dir, step).is_file()

    again = run_job(train_args(medium_root, run_dir), nproc=2)
    assert_ok(again)
    assert resumed_step(again.stdout) == step
    assert_same_weights(run_dir, reference[2])


@pytest.mark.processes
def test_sigterm_exit_code_tells_preemption_apart(medium_root, reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    job = start([sys.executable, "-m", "job", *train_args(medium_root, run_dir)], log)
    wait_for_checkpoint(run_dir, 20, [job], log)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == EXIT_PREEMPTED == 75, log.read_text()
    stops = [line for line in log.read_text().splitlines() if line.startswith("stopped: ")]
    assert len(stops) == 1 and "run the same command again to resume" in stops[0]
    assert "Traceback" not in log.read_text() and "error:" not in log.read_text()

    assert_ok(run_job(train_args(medium_root, run_dir)))
    assert_same_weights(run_dir, reference[None])


@pytest.mark.processes
def test_ctrl_c_in_a_terminal_checkpoints_every_rank_and_says_how_to_resume(medium_root, reference, tmp_path):
    """SIGINT to the launcher's process group, as a terminal sends it (torch starts the workers in
    sessions of their own, so only the launcher gets it and passes it on)."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    launch = [sys.executable, "-m", "job.launch", "--standalone", "--nproc-per-node", "2", "-m", "job"]
    job = start([*launch, *train_args(medium_root, run_dir)], log)
    wait_for_checkpoint(run_dir, 20, [job], log)
    os.killpg(job.pid, signal.SIGINT)
    assert job.wait(timeout=60) == EXIT_PREEMPTED, log.read_text()

    output = log.read_text()
    stops = {int(step) for step in re.findall(r"\[rank [01]\] Ctrl-C \(SIGINT\): stopping after step (\d+)", output)}
    assert len(stops) == 1, f"all ranks stop after the same step:\n{output}"
    (step,) = stops
    assert checkpoint(run_dir, step).is_file()
    assert "press Ctrl-C again to stop at once" in output
    assert f"stopped: by Ctrl-C (SIGINT) after step {step}" in output and "run the same command again" in output
    assert "Traceback" not in output and "SignalException" not in output and "error:" not in output

    again = run_job(train_args(medium_root, run_dir), nproc=2)
    assert_ok(again)
    assert resumed_step(again.stdout) == step
    assert_same_weights(run_dir, reference[2])


@pytest.mark.processes
def test_a_second_ctrl_c_in_a_terminal_stops_the_launcher_at_once_with_130(medium_root, tmp_path):
    """make train-local's launcher with a terminal (a pty) for its output, Ctrl-C twice: exit 130,
    not 75 (the second press does not wait for a checkpoint); the host's one `interrupted:` line, no
    KeyboardInterrupt noise from a late press, and none of torch's notices between the job's lines."""
    run_dir = tmp_path / "run"
    # Steps of 320 samples, a vote every 10: the second press lands well before the stop's checkpoint.
    args = train_args(medium_root, run_dir, "train.epochs=30", "data.global_batch_size=320")
    launch = [sys.executable, "-m", "job.launch", "--standalone", "--nproc-per-node", "2", "-m", "job", *args]
    terminal, screen = pty.openpty()
    job = subprocess.Popen(
        launch, env=clean_env(), stdin=subprocess.DEVNULL, stdout=screen, stderr=screen, start_new_session=True
    )
    os.close(screen)
    shown = bytearray()

    def read_screen() -> None:
        with contextlib.suppress(OSError):  # EIO once every process has closed the terminal
            while chunk := os.read(terminal, 4096):
                shown.extend(chunk)

    reader = threading.Thread(target=read_screen, daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while max(checkpoint_steps(run_dir), default=0) < 10:
        assert time.monotonic() < deadline and job.poll() is None, shown.decode(errors="replace")
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGINT)
    while b"press Ctrl-C again" not in shown:
        assert time.monotonic() < deadline and job.poll() is None, shown.decode(errors="replace")
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGINT)
    code = job.wait(timeout=60)
    reader.join(timeout=10)
    os.close(terminal)
    output = shown.decode(errors="replace")
    assert code == EXIT_INTERRUPTED, output
    assert output.count("interrupted: Ctrl-C; run the same command again") == 1, output  # one per host
    for noise in ("KeyboardInterrupt", "Exception ignored", "Traceback", "death signal", "closing signal"):
        assert noise not in output, output


@pytest.mark.processes
def test_a_second_ctrl_c_stops_at_once_in_one_line(medium_root, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    job = start([sys.executable, "-m", "job", *train_args(medium_root, run_dir)], log)
    wait_for_checkpoint(run_dir, 10, [job], log)
    os.killpg(job.pid, signal.SIGINT)
    deadline = time.monotonic() + 60
    while "press Ctrl-C again" not in log.read_text():  # the first one was taken as a stop request
        assert time.monotonic() < deadline and job.poll() is None, log.read_text()
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGINT)  # before the next vote, up to 10 steps away
    assert job.wait(timeout=60) == 130, log.read_text()
    lines = log.read_text().splitlines()
    assert lines[-1].startswith("interrupted: Ctrl-C; run the same command again to resume"), lines
    assert "Traceback" not in log.read_text()


@pytest.mark.processes
def test_sigterm_before_training_stops_at_once(tmp_path):
    """Waiting in the rendezvous for a rank that never comes (C++ code, where a Python handler
    would never run): nothing to save, so SIGTERM keeps its default action and ends it now."""
    env = clean_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    log = tmp_path / "log"
    job = start([sys.executable, "-m", "job", "train", f"run.dir={tmp_path / 'run'}"], log, env)
    port = int(env["MASTER_PORT"])
    deadline = time.monotonic() + 120
    while not listens_on(job.pid, port):  # rank 0 hosts the store: listening, it waits for rank 1
        assert time.monotonic() < deadline and job.poll() is None, log.read_text()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) == -signal.SIGTERM, log.read_text()
    assert not (tmp_path / "run").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` has a TCP socket listening on `port`."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                return True
    return False


def launch_by_hand(
    root: Path,
    run_dir: Path,
    tmp_path: Path,
    timeout_s: int,
    nproc: int = 2,
    *extra: str,
    job: tuple[str, ...] = ("-m", "job"),
) -> list[tuple[subprocess.Popen, Path]]:
    """`nproc` ranks started directly with the env:// variables (no launcher to notice a failure):
    what each rank does on its own when its peer hangs or dies. `job`: how python starts the job."""
    port = str(free_port())
    ranks = []
    for rank in range(nproc):
        env = clean_env(
            RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
        )  # fmt: skip
        log = tmp_path / f"rank{rank}.log"
        cmd = [sys.executable, *job, *train_args(root, run_dir, f"dist.timeout_s={timeout_s}", *extra)]
        ranks.append((start(cmd, log, env), log))
    return ranks


@pytest.mark.processes
@pytest.mark.parametrize(
    ("fault", "timeout_s", "message"),
    [
        (signal.SIGSTOP, 5, "[rank 0] error: a peer rank stopped answering: no reply within dist.timeout_s=5 s"),
        (signal.SIGKILL, 120, "[rank 0] error: a peer rank died ("),
    ],
    ids=["hung", "dead"],
)
def test_a_lost_peer_ends_the_job_within_the_timeout_naming_the_cause(medium_root, tmp_path, fault, timeout_s, message):
    run_dir = tmp_path / "run"
    (rank0, log0), (rank1, log1) = launch_by_hand(medium_root, run_dir, tmp_path, timeout_s)
    try:
        wait_for_checkpoint(run_dir, 10, [rank0, rank1], log0)
        faulted = time.monotonic()
        rank1.send_signal(fault)
        assert rank0.wait(timeout=timeout_s + 60) == 1, log0.read_text()
        waited = time.monotonic() - faulted
        assert waited < min(timeout_s, 10) + 20, f"rank 0 took {waited:.0f} s to give up"
        errors = [line for line in log0.read_text().splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith(message), log0.read_text()
        assert "Traceback" not in log0.read_text()
    finally:
        for proc in (rank0, rank1):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.processes
def test_a_hang_names_the_rank_that_did_not_arrive_and_every_live_rank_writes_its_stacks(medium_root, tmp_path):
    """Issue 21, case 6: 3 ranks, rank 1 SIGSTOPped mid-training. Ranks 0 and 2 each end with one
    line naming rank 1 and the step whose collective it never reached, and write their own Python
    stacks (the wait that timed out, and every thread) to hang/rank-N.txt in the run directory."""
    run_dir = tmp_path / "run"
    ranks = launch_by_hand(medium_root, run_dir, tmp_path, 5, 3, "data.global_batch_size=48")
    (rank0, log0), (rank1, _), (rank2, log2) = ranks
    try:
        wait_for_checkpoint(run_dir, 10, [rank0, rank1, rank2], log0)
        logged = log0.read_text().count("Train Epoch")
        while log0.read_text().count("Train Epoch") == logged:  # training again: the next step's line
            time.sleep(0.02)
        rank1.send_signal(signal.SIGSTOP)
        steps, accounts = [], []
        for rank, (proc, log) in ((0, (rank0, log0)), (2, (rank2, log2))):
            assert proc.wait(timeout=90) == EXIT_FAILED, log.read_text()
            errors = [line for line in log.read_text().splitlines() if "error:" in line]
            assert len(errors) == 1 and "Traceback" not in log.read_text(), log.read_text()
            assert errors[0].startswith(f"[rank {rank}] error: a peer rank stopped answering"), errors[0]
            # A step's collective; rarely, if the stop landed there, the checkpoint's after a step.
            named = re.search(
                r"rank 1 did not arrive at (step (\d+)'s|the collective while writing a checkpoint after step (\d+))",
                errors[0],
            )
            assert named, errors[0]
            steps.append(named[1])
            accounts.append(hang_account(errors[0]))
            stacks = run_dir / "hang" / f"rank-{rank}.txt"
            assert f"this rank's stacks: {stacks}" in errors[0], errors[0]
            text = stacks.read_text()
            assert "train_epoch" in text and "Current thread" in text, text  # the wait, and every thread
        # The same place on both, after step 10; and the same account, where one rank got further (job/hang.py).
        assert steps[0] == steps[1] and int(re.findall(r"\d+", steps[0])[0]) > 10, steps
        assert accounts[0] == accounts[1], accounts
        assert not (run_dir / "hang" / "rank-1.txt").exists()
    finally:
        for proc, _ in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def hang_account(error_line: str) -> str:
    """What a hang's error line says about the ranks (who did not arrive where, who got further),
    without the parts that differ between ranks: the transport's detail and the stacks' file."""
    account = re.search(r"\); (.*); this rank's stacks: ", error_line)
    assert account, error_line
    return account[1]


@pytest.mark.processes
@pytest.mark.parametrize(
    ("stop_at", "place"),
    [
        ("hook:17", "step 17's collective"),
        ("gather", "the collective while writing a checkpoint after step 10"),
    ],
    ids=["in-a-step", "halfway-through-a-gather"],
)
def test_a_rank_that_stops_at_a_known_collective_is_named_there_by_every_live_rank(
    medium_root, tmp_path, stop_at, place
):
    """Rank 1 stops itself (tests/probes/stop_itself.py) at a known point instead of wherever a
    signal lands; ranks 0 and 2 must both name that point, in the same words.
    - in-a-step: before its step-17 gradient all-gather. The gradient hook summed a failed
      all-gather's empty buffers into the gradients: the live ranks trained on through steps 17-19
      and named step 20, where the stop vote, outside the hook, raised.
    - halfway-through-a-gather: before the checkpoint's gather of RNG streams. Rank 2, a sender,
      got through it and waited in the checkpoint's next collective while rank 0 waited in the
      gather: they named "step 10's collective" and "the collective while writing a checkpoint
      after step 10". Live ranks that time out in different collectives are what CI met (rank 0
      named step 20, rank 2 step 16), where a rank got through a step-16 collective the other
      did not; here it happens at a known place."""
    run_dir = tmp_path / "run"
    probe = (str(REPO / "tests/probes/stop_itself.py"), stop_at)
    ranks = launch_by_hand(medium_root, run_dir, tmp_path, 5, 3, "data.global_batch_size=48", job=probe)
    try:
        accounts = []
        for rank, (proc, log) in ((0, ranks[0]), (2, ranks[2])):
            assert proc.wait(timeout=120) == EXIT_FAILED, log.read_text()
            errors = [line for line in log.read_text().splitlines() if "error:" in line]
            assert len(errors) == 1 and "Traceback" not in log.read_text(), log.read_text()
            assert errors[0].startswith(f"[rank {rank}] error: a peer rank stopped answering"), errors[0]
            accounts.append(hang_account(errors[0]))
        assert accounts == [f"rank 1 did not arrive at {place}"] * 2, accounts
    finally:
        for proc, _ in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.processes
def test_a_hung_rank_that_hosts_the_store_is_named_as_the_likely_one(medium_root, tmp_path):
    """Started by hand (or with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), rank 0's process hosts the
    store the ranks would answer in: stopped, it cannot be asked, and the line says so."""
    run_dir = tmp_path / "run"
    (rank0, log0), (rank1, log1) = launch_by_hand(medium_root, run_dir, tmp_path, 5)
    try:
        wait_for_checkpoint(run_dir, 10, [rank0, rank1], log0)
        rank0.send_signal(signal.SIGSTOP)
        assert rank1.wait(timeout=90) == EXIT_FAILED, log1.read_text()
        errors = [line for line in log1.read_text().splitlines() if "error:" in line]
        assert len(errors) == 1 and "the process group's store did not answer either" in errors[0], errors
        assert "rank 0 is the likely one" in errors[0] and "rank-1.txt" in errors[0], errors[0]
        assert "Current thread" in (run_dir / "hang" / "rank-1.txt").read_text()
    finally:
        for proc in (rank0, rank1):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_nccl_flight_recorder_dumps_into_the_run_directory_unless_told_otherwise(tmp_path):
    """The variables torch 2.14.1 reads (their names are in its library), set before any process group."""
    import mmap

    from job.hang import flight_recorder_env

    environ: dict[str, str] = {}
    flight_recorder_env(tmp_path / "run", environ)
    assert environ == {
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": f"{(tmp_path / 'run').resolve()}/hang/nccl-trace-rank-",  # + the rank
    }
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for name in environ:
            if name != "TORCH_NCCL_DUMP_ON_TIMEOUT":  # read in libtorch_cuda (ProcessGroupNCCL.hpp)
                assert data.find(name.encode() + b"\0") >= 0, name
    # The user's own choices, in either torch's current or its older (still read) names, are kept.
    mine = {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "0",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/x/",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
    }
    environ = dict(mine)
    flight_recorder_env(tmp_path / "run", environ)
    assert environ == mine


def test_a_hang_report_names_the_step_or_the_phase():
    from job.hang import Whereabouts

    assert Whereabouts(step=37, phase=None).collective() == "step 37's collective"
    assert Whereabouts(step=40, phase="writing a checkpoint").collective() == (
        "the collective while writing a checkpoint after step 40"
    )
    assert Whereabouts().collective() == "the collective while starting"


def test_a_phase_is_left_when_its_block_ends_and_kept_when_it_raises():
    from job.hang import Whereabouts

    at = Whereabouts()
    at.start_step(3)
    with at.during("writing a checkpoint"):
        assert at.collective() == "the collective while writing a checkpoint after step 3"
    assert (at.collective(), at.moves) == ("step 3's collective", 3)
    with pytest.raises(RuntimeError), at.during("testing epoch 1"):
        raise RuntimeError("a collective timed out")
    assert at.collective() == "the collective while testing epoch 1 after step 3"  # what the report names


def test_every_live_rank_names_the_earliest_place_and_who_got_further_in_the_same_words():
    """The CI case: rank 1 stopped halfway through a step-16 collective; rank 0 got through it and
    timed out in step 17's, rank 2 timed out in it. Each rank hears both answers (its own first)."""
    from job.hang import Whereabouts, who_did_not_arrive

    def at_step(step: int) -> Whereabouts:
        at = Whereabouts()
        for n in range(1, step + 1):
            at.start_step(n)
        return at

    heard_by_rank0 = {0: at_step(17), 2: at_step(16)}
    heard_by_rank2 = {2: at_step(16), 0: at_step(17)}
    expected = (
        "rank 1 did not arrive at step 16's collective (rank 0 got through it and waited at step 17's collective)"
    )
    assert who_did_not_arrive(heard_by_rank0, 3) == who_did_not_arrive(heard_by_rank2, 3) == expected
    assert who_did_not_arrive({0: at_step(17), 2: at_step(17)}, 3) == "rank 1 did not arrive at step 17's collective"
    assert who_did_not_arrive({0: at_step(5), 1: at_step(5)}, 2) == (
        "every rank answered after the timeout at step 5's collective (a slow rank, not a stopped one)"
    )
    assert who_did_not_arrive({0: at_step(5)}, 3) == "ranks 1, 2 did not arrive at step 5's collective"


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv "
         "operation to complete", "stopped answering"),
        ("Application timeout caused pair closure", "stopped answering"),  # from DDP's backward, under load
        ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:19365: Connection "
         "reset by peer. This is typically caused by a remote worker hanging", "died (Read error [127.0.0.1]:19365: "
         "Connection reset by peer)"),
        ("Connection closed by peer [127.0.0.1]:8888", "died (Connection closed by peer [127.0.0.1]:8888)"),
        # From DDP's backward, through the gradient hook's future (job/collectives.py)
        ("Got the following error when running the callback: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/"
         "gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 5000ms for send operation to complete",
         "stopped answering: no reply within dist.timeout_s=5 s (Timed out waiting 5000ms for send operation to "
         "complete)"),
    ],
)  # fmt: skip
def test_gloo_failures_seen_here_read_as_a_lost_peer(message, kind):
    from job.peer_lost import peer_lost_error

    assert kind in str(peer_lost_error(RuntimeError(message), timeout_s=5))


def test_other_runtime_errors_keep_their_traceback():
    from job.peer_lost import peer_lost_error

    assert peer_lost_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), timeout_s=5) is None


@pytest.mark.processes
def test_a_run_time_failure_on_one_rank_is_a_run_time_failure_on_every_rank(tiny_root, tmp_path):
    """Rank 0's disk fills while rank 1 waits for the checkpoint: both exit 1 (a restart may
    help), never 2 (bad input), which a Job's podFailurePolicy turns into failing the Job."""
    port, run_dir = str(free_port()), tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_root, run_dir, "checkpoint.every_steps=3", "checkpoint.keep=100")]
    ranks = []
    commands = [[sys.executable, str(REPO / "tests/probes/disk_full.py"), "3"], [sys.executable, "-m", "job"]]
    for rank, cmd in enumerate(commands):
        env = clean_env(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
        )  # fmt: skip
        ranks.append(start([*cmd, *args], tmp_path / f"rank{rank}.log", env))
    codes = [job.wait(timeout=300) for job in ranks]
    assert codes == [EXIT_FAILED, EXIT_FAILED], [(tmp_path / f"rank{r}.log").read_text()[-2000:] for r in (0, 1)]
    assert "No space left on device" in (tmp_path / "rank0.log").read_text()


STOP_LOOP_FAST = 6
STOP_LOOP_MORE = 14
"""make test runs STOP_LOOP_FAST stops, the slow tier STOP_LOOP_MORE more: .ci/run runs both, 20
in all. At torch 2.13.0's rate (7 hangs in 15 stops) 6 stops miss such a regression 1 time in 45
(0.53**6), 20 stops 1 in 300,000."""
STOP_BOUND_S = 25
"""A stop's bound: a rank that hangs at exit is killed by torch's agent 30 s after its SIGTERM
("Unable to shutdown process ... via 15, forcefully exiting via 9"), so anything under that shows
a hang; a clean stop takes a few seconds here, however loaded (a liveness bound, not a timing)."""


@pytest.mark.processes
@pytest.mark.parametrize("stops", [STOP_LOOP_FAST, pytest.param(STOP_LOOP_MORE, marks=pytest.mark.slow)])
def test_every_rank_exits_promptly_after_each_of_many_stops(tiny_root, tmp_path, stops):
    """Issue 22 case 2: on torch 2.13.0, 7 of 15 SIGTERM stops hung at exit (the gloo process group's
    destructor against a gloo thread, for the GIL) and some aborted ("terminate called without an
    active exception"). Each of `stops` stops of a 2-rank job (STOP_LOOP_FAST in make test, STOP_LOOP_MORE
    in the slow tier) must end within STOP_BOUND_S, with exit 75 from every worker, and neither a
    forced kill nor an abort."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    launch = [sys.executable, "-m", "job.launch", "--standalone", "--nproc-per-node", "2", "-m", "job", "train"]
    args = tiny_overrides(tiny_root, run_dir, "train.epochs=10000", "checkpoint.every_steps=10", "train.log_interval=1")
    durations = []
    for attempt in range(stops):
        job = start([*launch, *args], log)
        deadline = time.monotonic() + 240
        while log.read_text().count("Train Epoch") < 3:  # training, past its first steps
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        signalled = time.monotonic()
        job.send_signal(signal.SIGTERM)
        try:
            code = job.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            workers = psutil.Process(job.pid).children(recursive=True)
            for worker in workers:
                worker.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack into the log
            psutil.wait_procs(workers, timeout=10)  # the stacks are written once each has died of it
            kill_tree(job.pid)
            pytest.fail(f"stop {attempt + 1} took over {STOP_BOUND_S} s:\n{log.read_text()}")
        durations.append(time.monotonic() - signalled)
        output = log.read_text()
        assert code == EXIT_PREEMPTED, f"stop {attempt + 1}: exit {code}\n{output}"
        assert "forcefully exiting" not in output and "terminate called" not in output, output
    print(f"{stops} stops: {min(durations):.1f} to {max(durations):.1f} s each")


@pytest.mark.processes
def test_the_store_host_keeps_the_store_up_for_a_rank_that_asks_later(tmp_path):
    """Issue 21, case 6, under load: the live ranks time out seconds apart. Rank 0's process hosts
    the store and exits once it has its own answer; rank 2, asking 2 s later, must still reach the
    store and hear rank 0 (on main it got no answer and its line blamed rank 0: CI, load 9-14)."""
    port = str(free_port())
    procs = []
    for rank in range(3):
        env = clean_env(
            RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="3",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
        )  # fmt: skip
        cmd = [sys.executable, str(REPO / "tests/probes/hang_late_asker.py")]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert json.loads(outputs[2][0]) == {"0": "step 7's collective", "2": "step 7's collective"}
