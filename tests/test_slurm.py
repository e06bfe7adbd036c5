"""`make slurm-test`: slurm/train.sbatch submitted to a real Slurm cluster on this machine.

tests/slurm_cluster.py starts munged, slurmctld and two slurmd "nodes" (both this machine, 2
cores each) once for the module. Every job is the real sbatch script, 2 nodes x 1 CPU process,
on generated digits (STEPS_PER_EPOCH x BATCH samples, 2 epochs, a checkpoint every 10 steps),
and must end with model.pt bit-identical to the same config run by torchrun on this machine
at 2 ranks (1 thread per rank on both sides):
(a) straight through; (b) preempted mid-run by a job of the high partition, requeued, resumed;
(c) the same after the time-limit signal (scancel --batch --signal=TERM stands in for
--signal=B:TERM@grace); (d) one worker SIGKILLed, the group restarted by torchrun; (e) bad
input: exit 2, never requeued, its one line in the job's output.

A job takes one core of each node, so two run side by side. To stay within minutes on a
2-core machine the jobs go in three waves: (a) with both (e) jobs and the local reference
run; (b) alone, since its high-partition job takes a whole node; (c) with (d), each
interrupted from a background thread when its own run reaches the step to interrupt at.

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge (the target
installs them when missing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import LAUNCH_VARS, REPO, load_state, make_tiny_mnist, metrics_history, mlflow_history
from slurm_cluster import (
    PACKAGES,
    ClusterError,
    SlurmCluster,
    alive,
    missing_commands,
    port_in_use,
    processes_of,
    remove_leftovers,
)

from job.run_dir import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.processes]

SBATCH = REPO / "slurm" / "train.sbatch"
STEPS_PER_EPOCH, EPOCHS, CHECKPOINT_EVERY, BATCH = 50, 2, 10, 32
STEPS = STEPS_PER_EPOCH * EPOCHS
CONFIG = f"""\
# The recipe on generated digits ({STEPS_PER_EPOCH * BATCH} samples), with a checkpoint every {CHECKPOINT_EVERY} steps.
seed: 1
data:
  verify: false          # generated IDX files, not MNIST's
  download: false
  global_batch_size: {BATCH}
  test_batch_size: 50
optim:
  lr: 0.05
train:
  epochs: {EPOCHS}
  log_interval: 5
checkpoint:
  every_steps: {CHECKPOINT_EVERY}
"""
JOB_TIMEOUT_S = 240  # one run with a requeue (about 12 s) or a restart, beside another, on a loaded 2-core machine


def require_root_and_slurm() -> None:
    """No skip: `make slurm-test` on a machine that cannot run it is a failure, with the fix."""
    if os.geteuid() != 0:
        pytest.fail("make slurm-test needs root (it runs slurmctld, slurmd and munged)", pytrace=False)
    missing = missing_commands()
    if missing:
        pytest.fail(f"make slurm-test needs {', '.join(missing)}: apt-get install {' '.join(PACKAGES)}", pytrace=False)


@pytest.fixture(scope="module")
def cluster() -> SlurmCluster:
    require_root_and_slurm()
    with SlurmCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The config file, beside generated digits in data/ (job_args points data.root there)."""
    folder = tmp_path_factory.mktemp("config")
    make_tiny_mnist(folder / "data", train=STEPS_PER_EPOCH * BATCH)
    path = folder / "tiny.yaml"
    path.write_text(CONFIG)
    return path


def job_args(config: Path, run_dir: Path) -> list[str]:
    return ["--config", str(config), f"data.root={config.parent / 'data'}", f"run.dir={run_dir}"]


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Callable[[], Path]:
    """The same config run by torchrun on this machine at 2 ranks, 1 thread each: the expected bits.
    It starts with the module and runs beside the first Slurm job; calling the fixture waits for it."""
    folder = tmp_path_factory.mktemp("reference")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "job.launch", "--standalone", "--nproc-per-node", "2",
           "-m", "job", "train", *job_args(config, folder / "run")]  # fmt: skip
    with open(folder / "log", "w") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def run_dir() -> Path:
        assert process.wait(timeout=300) == 0, (folder / "log").read_text()
        return folder / "run"

    yield run_dir
    if process.poll() is None:  # a test failed before waiting for it
        process.kill()
        process.wait()


class Job:
    """One submission of slurm/train.sbatch: 2 nodes x 1 process, its run directory and output in `work`."""

    def __init__(
        self, cluster: SlurmCluster, config: Path, work: Path, *overrides: str, env: dict[str, str] | None = None
    ) -> None:
        """`env`: more of the submitting shell's environment (sbatch hands it to the job)."""
        self.cluster, self.work = cluster, work
        self.run_dir = work / "run"
        env = cluster.env(JOB_PYTHON=sys.executable, RDZV_PORT=str(cluster.new_port()), **(env or {}))
        for name in LAUNCH_VARS:
            env.pop(name, None)
        argv = ["--nodes=2", "--partition=low", f"--output={work}/slurm-%j.out", str(SBATCH),
                *job_args(config, self.run_dir), *overrides]  # fmt: skip
        self.id = cluster.sbatch(argv, cwd=work, env=env)
        self._interrupter: threading.Thread | None = None
        self._interrupt_error: BaseException | None = None

    @property
    def output(self) -> str:
        path = self.work / f"slurm-{self.id}.out"
        return path.read_text() if path.exists() else ""

    def interrupt(self, action: Callable[[Job], None], at_step: int) -> None:
        """In the background: `action(self)` once a checkpoint at `at_step` or later exists (the run is
        mid-way, with something to resume); wait_until_done raises what it raised."""

        def run() -> None:
            try:
                self.wait_for_checkpoint(at_step)
                action(self)
            except BaseException as e:  # noqa: BLE001 (handed to the test's thread)
                self._interrupt_error = e

        self._interrupter = threading.Thread(target=run, name=f"interrupt job {self.id}", daemon=True)
        self._interrupter.start()

    def wait_until_done(self, restarts: int = 0) -> dict[str, str]:
        """The job's final `scontrol show job` fields, once it has ended after `restarts` requeues."""
        try:
            info = self.cluster.wait_until_done(self.id, JOB_TIMEOUT_S, restarts=restarts)
        except ClusterError as e:
            raise ClusterError(f"{e}\n--- job output\n{self.output}") from None
        finally:
            if self._interrupter is not None:
                self._interrupter.join(timeout=JOB_TIMEOUT_S)
        if self._interrupt_error is not None:
            raise self._interrupt_error
        return info

    def wait_for_checkpoint(self, step: int) -> None:
        def written() -> bool:
            checkpoints = RunDir(self.run_dir).checkpoints
            steps = [checkpoints.step_of(p) for p in checkpoints.files()]
            assert self.cluster.job(self.id)["JobState"] in ("PENDING", "RUNNING"), self.output
            return max(steps, default=0) >= step

        self.cluster.wait_for(written, JOB_TIMEOUT_S, f"job {self.id}'s checkpoint at step >= {step}")

    def hold(self) -> list[int]:
        """SIGSTOP the job's workers (its processes with RANK set, not torchrun or srun) where they are:
        the run cannot reach its last step before a signal already on its way arrives, however fast
        the machine and however slow the scheduler. release_once_signalled lets them go on."""
        workers = [p.pid for p in self.cluster.job_processes(self.id) if "RANK" in p.env]
        assert len(workers) == 2, f"2 workers expected, found {workers}\n{self.output}"
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        return workers

    def release_once_signalled(self, workers: list[int], sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGCONT the held workers once `sig` is pending in every one (or something, e.g. slurmd's own
        SIGCONT before its SIGTERM, has let it run on, or it is gone)."""
        self.cluster.wait_for(
            lambda: all(_signal_pending_or_running(pid, sig) for pid in workers),
            JOB_TIMEOUT_S,
            f"{sig.name} to reach job {self.id}'s held workers",
        )
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def events(self, kind: str) -> list[dict]:
        lines = RunDir(self.run_dir).metrics.read_text().splitlines()
        return [event for event in map(json.loads, lines) if event["event"] == kind]

    def summary(self) -> dict:
        return json.loads(RunDir(self.run_dir).summary.read_text())


# When to interrupt a run. SIGTERM is acted on at the ranks' next stop vote (every 10 steps), so a
# signal sent once the step-10 checkpoint exists stops the run at step 20 at the earliest: the
# resume is at step >= 20, with 80 steps left for Slurm to deliver the signal. A SIGKILL acts at
# once and the run resumes from the newest checkpoint: it waits for step 20's.
SIGTERM_AFTER_STEP = CHECKPOINT_EVERY
SIGKILL_AFTER_STEP = 2 * CHECKPOINT_EVERY


def _signal_pending_or_running(pid: int, sig: signal.Signals) -> bool:
    """/proc/PID/status: `sig` pending for the thread or the process (SigPnd, ShdPnd: hex masks with
    bit sig-1), or the process no longer stopped (State other than T), or gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except OSError:
        return True
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return bool(pending & (1 << (sig - 1))) or not fields["State"].strip().startswith("T")


def assert_same_bits(run_dir: Path, reference: Path) -> None:
    ours, theirs = load_state(RunDir(run_dir).model), load_state(RunDir(reference).model)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "weights differ from the local torchrun run"


def assert_resumed_mid_run(job: Job) -> int:
    """The run resumed from a checkpoint at step >= 20 (never from scratch) and finished its steps; the step."""
    resumes = [event["step"] for event in job.events("resume")]
    assert len(resumes) == 1 and 2 * CHECKPOINT_EVERY <= resumes[0] < STEPS, (resumes, job.output)
    assert job.summary()["global_step"] == STEPS and job.summary()["resumes"] == 1
    return resumes[0]


def state(info: dict[str, str]) -> tuple[str, str, str]:
    return info["JobState"], info["ExitCode"], info["Restarts"]


# --- wave 1: (a), (e) ------------------------------------------------------------------------

BAD_INPUT = {
    # refused by the script's config check, before any training step starts: one line
    "config-error": ("optim.lr=-1", "optim.lr=-1.0 is out of range", 1),
    # found by the workers: job.launch and srun carry their exit 2; one line per node
    "data-error-in-the-workers": ("data.root=/nonexistent", "MNIST files missing under /nonexistent", 2),
}


@pytest.fixture(scope="module")
def first_wave(cluster, config, tmp_path_factory) -> dict[str, Job]:
    """(a) and the bad-input jobs, submitted together; Slurm starts each when a core per node is free."""
    jobs = {"a": Job(cluster, config, tmp_path_factory.mktemp("a"))}
    for name, (override, _, _) in BAD_INPUT.items():
        jobs[name] = Job(cluster, config, tmp_path_factory.mktemp(name), override)
    return jobs


def test_a_two_node_job_trains_to_the_bits_of_a_local_run(reference, first_wave):
    job = first_wave["a"]
    assert state(job.wait_until_done()) == ("COMPLETED", "0:0", "0"), job.output
    summary = job.summary()
    assert summary["world_size"] == 2 and summary["global_step"] == STEPS and summary["resumes"] == 0
    assert "2 node(s) x 1 process(es), 1 thread(s) each" in job.output
    assert_same_bits(job.run_dir, reference())
    print(f"(a) world size 2, {summary['global_step']} steps, no resume: same bits")


@pytest.mark.parametrize("name", BAD_INPUT)
def test_e_bad_input_exits_2_is_not_requeued_and_says_why_in_one_line(cluster, first_wave, name):
    _, needle, lines = BAD_INPUT[name]
    job = first_wave[name]
    job.wait_until_done()
    time.sleep(2)  # a requeue would have shown by now
    assert state(cluster.job(job.id)) == ("FAILED", "2:0", "0"), job.output
    errors = [line for line in job.output.splitlines() if re.match(r"(\[rank \d+\] )?error: ", line)]
    assert len(errors) == lines and all(needle in line for line in errors), job.output
    assert "Traceback" not in job.output
    assert "bad input (exit 2): not requeued" in job.output
    print(f"(e) {name}: FAILED, exit 2, not requeued: {errors[0]}")


# --- wave 2: (b) -----------------------------------------------------------------------------


def test_b_preempted_by_the_high_partition_it_is_requeued_and_resumes(
    cluster, config, reference, mlflow_server, tmp_path
):
    cluster.wait_until_idle(JOB_TIMEOUT_S)  # the high job must find only this one to preempt
    # Tracked in MLflow, the server's URI from the submitting shell (slurm/README.md, MLflow tracking).
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    job = Job(cluster, config, tmp_path, "tracking.mlflow=true", "tracking.experiment=slurm-b", env=env)
    job.wait_for_checkpoint(SIGTERM_AFTER_STEP)
    held = job.hold()  # mid-run until the preemption's SIGTERM is there (it once came after step 100)
    # A whole node in the high partition: only the low job's cores can make room.
    high = cluster.sbatch(["--partition=high", "--nodes=1", "--exclusive", "--output=/dev/null", "--wrap=sleep 1"],
                          cwd=tmp_path)  # fmt: skip
    job.release_once_signalled(held)
    info = job.wait_until_done(restarts=1)
    assert state(info) == ("COMPLETED", "0:0", "1"), job.output
    assert cluster.job(high)["JobState"] == "COMPLETED"
    assert "stopped (exit 75): Slurm requeues the job (RequeueExit=75)" in job.output
    assert "SLURM_RESTART_COUNT=1" in job.output
    step = assert_resumed_mid_run(job)
    assert_same_bits(job.run_dir, reference())
    # The requeued job continued its MLflow run: one run, every point of metrics.jsonl once.
    client = mlflow_server.client()
    (run,) = client.search_runs([client.get_experiment_by_name("slurm-b").experiment_id])
    assert mlflow_history(client, run.info.run_id) == metrics_history(job.run_dir)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    print(f"(b) preempted, exit 75, requeued once, resumed at step {step} of {STEPS}: same bits, one MLflow run")


# --- wave 3: (c), (d) ------------------------------------------------------------------------


def send_time_limit_signal(job: Job) -> None:
    """What --signal=B:TERM@<grace> sends when the time limit nears: SIGTERM to the batch shell only
    (which forwards it to the steps), the workers held mid-run until it reaches them."""
    held = job.hold()
    job.cluster.client("scancel", "--batch", "--signal=TERM", str(job.id))
    job.release_once_signalled(held)


def kill_worker_of_rank_1(job: Job) -> None:
    (worker,) = [p.pid for p in job.cluster.job_processes(job.id) if p.env.get("RANK") == "1"]  # not torchrun
    os.kill(worker, signal.SIGKILL)


@pytest.fixture(scope="module")
def third_wave(cluster, config, tmp_path_factory) -> dict[str, Job]:
    """(c) and (d) side by side, on the cluster without RequeueExit=75 (not every admin sets it):
    the script must requeue (c) itself; (d) never exits 75. The module's last wave on this cluster,
    which keeps the setting until it stops."""
    cluster.wait_until_idle(JOB_TIMEOUT_S)
    cluster.reconfigure("RequeueExit", None)
    jobs = {
        "c": Job(cluster, config, tmp_path_factory.mktemp("c")),
        "d": Job(cluster, config, tmp_path_factory.mktemp("d")),
    }
    jobs["c"].interrupt(send_time_limit_signal, at_step=SIGTERM_AFTER_STEP)
    jobs["d"].interrupt(kill_worker_of_rank_1, at_step=SIGKILL_AFTER_STEP)
    return jobs


def test_c_the_time_limit_signal_stops_requeues_and_resumes(reference, third_wave):
    job = third_wave["c"]
    assert state(job.wait_until_done(restarts=1)) == ("COMPLETED", "0:0", "1"), job.output
    assert "SIGTERM: asking the training to stop after a checkpoint" in job.output
    assert "stopped (exit 75): requeueing the job (scontrol requeue)" in job.output
    assert "SLURM_RESTART_COUNT=1" in job.output
    step = assert_resumed_mid_run(job)
    assert_same_bits(job.run_dir, reference())
    print(f"(c) time-limit signal, exit 75, requeued once, resumed at step {step} of {STEPS}: same bits")


def test_d_a_killed_worker_is_restarted_by_torchrun_in_the_same_allocation(reference, third_wave):
    job = third_wave["d"]
    assert state(job.wait_until_done()) == ("COMPLETED", "0:0", "0"), job.output
    # torchrun saw the worker die and started both nodes' workers again, in the same allocation
    assert "failed (exitcode: -9)" in job.output and job.output.count("Training on 2 rank(s)") == 2, job.output
    step = assert_resumed_mid_run(job)
    assert_same_bits(job.run_dir, reference())
    print(f"(d) worker of rank 1 SIGKILLed, group restarted, resumed at step {step} of {STEPS}: same bits")


# A job whose steps run on both nodes until they are killed.
SLEEPER = """#!/bin/bash
srun sleep 300
"""


def test_a_failing_test_leaves_no_daemon_job_port_or_state_behind(tmp_path):
    require_root_and_slurm()
    script = tmp_path / "sleeper.sbatch"
    script.write_text(SLEEPER)
    with pytest.raises(RuntimeError, match="a failing test"), SlurmCluster() as cluster:
        job_id = cluster.sbatch(["--nodes=2", "--output=/dev/null", str(script)], cwd=tmp_path)

        def both_tasks_run() -> bool:
            return (
                len([p for p in cluster.job_processes(job_id) if p.argv[1:] == ["300"] and p.argv[0].endswith("sleep")])
                == 2
            )

        cluster.wait_for(both_tasks_run, 30, "the step's task on both nodes")
        pids = processes_of(cluster.conf)
        raise RuntimeError("a failing test")
    assert len(pids) >= 5 + 2  # munged, slurmctld, its slurmscriptd, 2 slurmd; the batch shell, the tasks, ...
    assert not any(alive(pid) for pid in pids) and not processes_of(cluster.conf)
    assert not cluster.root.exists()
    assert not any(port_in_use(port) for port in (cluster.ctld_port, *cluster.node_ports.values()))


STARTER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from slurm_cluster import SlurmCluster
cluster = SlurmCluster()
cluster.start()
print(cluster.root, flush=True)
time.sleep(300)
"""


def test_the_leftovers_of_a_killed_test_process_are_removed_by_the_next_start():
    """A test process killed outright (a CI timeout) cannot stop its cluster: the next one does."""
    require_root_and_slurm()
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(REPO / "tests")], stdout=subprocess.PIPE, text=True)
    try:
        root = Path(starter.stdout.readline().strip())
        daemons = processes_of(root / "slurm.conf")
    finally:
        starter.kill()
        starter.wait()
    assert len(daemons) >= 5 and all(alive(pid) for pid in daemons) and root.exists()  # orphans now
    assert root in remove_leftovers()
    assert not any(alive(pid) for pid in daemons) and not root.exists()
    # The killed orphans are init's to reap: give it a moment, so that `ps` after the run lists none.
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in daemons) and time.monotonic() < deadline:
        time.sleep(0.1)
