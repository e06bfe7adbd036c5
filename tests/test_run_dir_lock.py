"""The run directory's lock across hosts (job/run_dir.py, RunDirLock): a holder is told apart by its
kernel's boot id and its process, never by host name (issue 21, case 3).

Each "host" is a real UTS namespace (its own host name) and mount namespace, where the kernel's
boot id file is bind-mounted over by one of the test's own: two processes of one machine then
read as two hosts that share a run directory (as two pods share a volume), with the same host
name, as a Kubernetes Indexed Job's replacement pod `mnist-ddp-0` has the name of the pod it
replaces. Needs root (namespaces, mounts), as make k8s-local-test does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import (
    REPO,
    assert_ok,
    assert_one_line_error,
    assert_same_weights,
    checkpoint_steps,
    clean_env,
    make_tiny_mnist,
    run_job,
    tiny_overrides,
)

from job.run_dir import RunDir

pytestmark = pytest.mark.processes

HOST = "mnist-ddp-0"


def on_host(
    boot_dir: Path, hostname: str, args: list[str], log: Path, boot_id: Path | None = None, pid_ns: bool = False
) -> subprocess.Popen:
    """`python -m job ARGS` on a "host" of its own: a UTS namespace named `hostname`, and a mount
    namespace whose /proc/sys/kernel/random/boot_id reads a fresh boot id (or `boot_id`'s: the same
    kernel); with `pid_ns`, in a PID namespace of its own too (a container), where the job is PID 1."""
    if boot_id is None:
        boot_id = boot_dir / f"boot-id-{uuid.uuid4()}"
        boot_id.write_text(f"{uuid.uuid4()}\n")
    script = f'hostname {hostname} && mount --bind {boot_id} /proc/sys/kernel/random/boot_id && exec "$@"'
    pid = ["--pid", "--fork", "--kill-child", "--mount-proc"] if pid_ns else []
    cmd = ["unshare", "--uts", "--mount", *pid, "--propagation", "private", "sh", "-c", script, "host"]
    with open(log, "w") as out:
        return subprocess.Popen(
            [*cmd, sys.executable, "-m", "job", *args], cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT
        )


@pytest.fixture(scope="module")
def needs_namespaces():
    probe = subprocess.run(["unshare", "--uts", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create namespaces here: {probe.stderr.decode().strip()}")


def wait_for(condition, what: str, procs: list[subprocess.Popen], log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{log.read_text()}"
        assert all(p.poll() is None for p in procs), f"ended before {what}:\n{log.read_text()}"
        time.sleep(0.01)


def test_a_replacement_pod_with_the_same_host_name_waits_for_the_frozen_one_and_resumes(needs_namespaces, tmp_path):
    """Issue 21 case 3: the old pod `mnist-ddp-0`, frozen, still holds the lock when its replacement,
    also `mnist-ddp-0`, starts: it was refused (exit 2, which the Job's podFailurePolicy turns into
    FailJob). Now it waits, by default up to 120 s (a dead host's NFS lock lease is 90 s), and once
    the old pod is gone takes the lock and resumes its checkpoint. (That the wait ends at its bound,
    with exit 1: the next test, with a short run.lock_wait_s.)"""
    root = make_tiny_mnist(tmp_path / "data", train=50 * 64)
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    args = ["train", *tiny_overrides(root, run_dir, "checkpoint.every_steps=10", "train.log_interval=5")]
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"

    old = on_host(tmp_path, HOST, args, old_log)
    wait_for(lambda: bool(checkpoint_steps(run_dir)) if RunDir(run_dir).checkpoints.path.is_dir() else False,
             "checkpoint", [old], old_log)  # fmt: skip
    old.send_signal(signal.SIGSTOP)  # frozen: alive, holding the lock, answering nothing
    try:
        new = on_host(tmp_path, HOST, args, new_log)
        wait_for(lambda: "waiting up to" in new_log.read_text(), "wait", [new], new_log)
        assert "waiting up to 120 s for it to end" in new_log.read_text(), new_log.read_text()  # the default
    finally:
        old.send_signal(signal.SIGKILL)  # the kubelet finally kills the old pod
        old.wait()
    assert new.wait(timeout=300) == 0, new_log.read_text()
    output = new_log.read_text()
    assert f"locked by another job (pid {old.pid} on {HOST} (boot " in output
    assert "Resuming from" in output
    assert_ok(run_job(["train", *tiny_overrides(root, reference, "checkpoint.every_steps=10", "train.log_interval=5")]))
    assert_same_weights(run_dir, reference)


def test_a_holder_elsewhere_that_never_ends_is_a_run_time_failure_not_bad_input(needs_namespaces, tmp_path):
    """The wait is bounded (run.lock_wait_s: 5 s here, 120 s by default); what follows is exit 1 (a
    retry may find the directory free), never 2."""
    root = make_tiny_mnist(tmp_path / "data", train=50 * 64)
    run_dir = tmp_path / "run"
    args = ["train", *tiny_overrides(root, run_dir, "checkpoint.every_steps=10", "run.lock_wait_s=5")]
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    old = on_host(tmp_path, HOST, args, old_log)
    wait_for(lambda: RunDir(run_dir).config.exists(), "config.yaml", [old], old_log)
    old.send_signal(signal.SIGSTOP)
    try:
        new = on_host(tmp_path, HOST, args, new_log)
        assert new.wait(timeout=300) == 1, new_log.read_text()
    finally:
        old.send_signal(signal.SIGKILL)
        old.wait()
    output = new_log.read_text()
    assert "waiting up to 5 s for it to end" in output, output  # waited, not refused at once
    errors = [line for line in output.splitlines() if "error: " in line]
    assert len(errors) == 1 and f"is in use by another job (pid {old.pid} on {HOST} (boot " in errors[0], output
    assert "Traceback" not in output


def test_a_container_on_the_same_kernel_whose_pid_the_holder_had_waits_for_it(needs_namespaces, tmp_path):
    """The same kernel (boot id), another PID namespace: the holder's pid (1, as the replacement's
    own) names another process here; only its start time tells them apart. The holder is not
    visible, so it is waited for (not refused as this host's own), and its end lets the run resume."""
    root = make_tiny_mnist(tmp_path / "data", train=50 * 64)
    run_dir = tmp_path / "run"
    args = ["train", *tiny_overrides(root, run_dir, "checkpoint.every_steps=10", "train.log_interval=5")]
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    boot_id = tmp_path / "boot-id"
    boot_id.write_text(f"{uuid.uuid4()}\n")
    old = on_host(tmp_path, HOST, args, old_log, boot_id=boot_id, pid_ns=True)
    wait_for(lambda: bool(checkpoint_steps(run_dir)) if RunDir(run_dir).checkpoints.path.is_dir() else False,
             "checkpoint", [old], old_log)  # fmt: skip
    old.send_signal(signal.SIGSTOP)  # unshare; its child, the job, is frozen below
    for child in Path(f"/proc/{old.pid}/task/{old.pid}/children").read_text().split():
        os.kill(int(child), signal.SIGSTOP)
    try:
        assert RunDir(run_dir).lock.read_text().startswith(f"pid 1 on {HOST} ")
        new = on_host(tmp_path, HOST, args, new_log, boot_id=boot_id, pid_ns=True)
        wait_for(lambda: "waiting up to" in new_log.read_text(), "wait", [new], new_log)
    finally:
        old.send_signal(signal.SIGKILL)  # --kill-child: the job goes with it
        old.wait()
    assert new.wait(timeout=300) == 0, new_log.read_text()
    output = new_log.read_text()
    assert f"locked by another job (pid 1 on {HOST} (boot {boot_id.read_text().strip()}, " in output
    assert "Resuming from" in output


def test_a_run_dir_that_is_a_file_is_refused_by_the_lock_in_one_line(tmp_path):
    """The lock is taken before anything else looks at the run directory, so its check is the one
    a run.dir naming a file meets (the start decision's copy of it was unreachable and is gone)."""
    run_file = tmp_path / "not-a-dir"
    run_file.write_text("a file\n")
    result = run_job(["train", *tiny_overrides(tmp_path / "no-data", run_file)])
    assert_one_line_error(result, f"run.dir {run_file} is a file, not a directory; choose another run.dir")
    assert result.returncode == 2 and run_file.read_text() == "a file\n"
