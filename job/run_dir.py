"""The run directory's contract: every file a run writes there, named once (docs/RUN-DIRECTORY.md).

Training (rank 0 only) writes config.yaml, metrics.jsonl, tb/, checkpoints/ (and mlflow_run.json
when tracking), then model.pt and summary.json at the end; `python -m job plot` writes plots/.
The job, the tools and the tests all find these files through RunDir; one test spells the names
as users read them (tests/README.md), so renaming one here is a change users see.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.errors import BadInputError, RunFailedError, message_line
from job.files import open_no_follow, refuse_symlinks, write_error_kind, write_fix
from job.safe_io import atomic_save

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        """The resolved config that ran (YAML)."""
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        """One JSON object per event (train, train_epoch, test, resume)."""
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoints(self) -> CheckpointDir:
        return CheckpointDir(self.path / "checkpoints")

    @property
    def model(self) -> Path:
        """The final weights: a plain state_dict, loadable with weights_only=True."""
        return self.path / "model.pt"

    @property
    def summary(self) -> Path:
        """The final figures (JSON)."""
        return self.path / "summary.json"

    @property
    def mlflow_run(self) -> Path:
        """The MLflow run this run directory is mirrored to (tracking.mlflow): its id, so that every
        restart continues that run (JSON, job/tracking.py)."""
        return self.path / "mlflow_run.json"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def lock(self) -> Path:
        """Present while a job runs here (RunDirLock), removed when it ends."""
        return self.path / ".lock"

    def written(self) -> list[Path]:
        """Every entry a job writes into or through (files and directories): none may be a symbolic
        link (job/files.py)."""
        return [
            self.lock, self.config, self.metrics, self.tensorboard, self.checkpoints.path,
            self.model, self.summary, self.plots, self.mlflow_run,
        ]  # fmt: skip

    def contents(self) -> list[Path]:
        """What the directory holds, the running job's lock aside."""
        return [p for p in self.path.iterdir() if p != self.lock] if self.path.is_dir() else []

    def results(self) -> list[Path]:
        """The files only a finished (or once-finished) run leaves: with no checkpoint beside
        them, they are results a fresh start would silently overwrite."""
        return [path for path in (self.model, self.summary) if path.exists()]


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
"""A random UUID the Linux kernel draws at each boot: the same for every process (and container)
under one kernel, different on every other host and after every reboot."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory's lock, as `.lock` names it: the process and the kernel it runs
    under. Host names are for people only; they repeat across a Job's pods and hosts."""

    pid: int
    host: str
    boot_id: str
    """The holder's kernel's BOOT_ID; empty where the platform has none."""
    start: str
    """The pid's start time in clock ticks since boot (/proc/PID/stat, field 22): a pid reused by
    another process has another start time."""

    _FORMAT = re.compile(r"pid (\d+) on (\S+) \(boot (\S*), started (\S*)\)")

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), _boot_id(), _start_ticks(os.getpid()))

    @classmethod
    def parse(cls, line: str) -> Holder | None:
        """The holder a `.lock` line names; None for a line this version did not write (an older
        job's, or one cut short), whose holder is then treated as one this process cannot see."""
        match = cls._FORMAT.match(line)
        return cls(int(match[1]), match[2], match[3], match[4]) if match else None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        return f"pid {self.pid} on {self.host} (boot {self.boot_id}, started {self.start}) since {since}"

    def alive_here(self) -> bool:
        """Whether this is a live process of this kernel that this process can see: same boot id,
        and its pid (in this pid namespace) started at the same tick. A frozen pod's process on
        another node, or in a container's pid namespace of its own, is not."""
        return bool(self.boot_id) and self.boot_id == _boot_id() and self.start == _start_ticks(self.pid)


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot; empty when it is gone or unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # field 22; the command name may hold spaces


class RunDirLock:
    """Rank 0's exclusive hold on a run directory for the whole run, so that two jobs started on
    one directory cannot overwrite each other's checkpoints and results.

    An flock(2) on `.lock` (NFSv4 and local filesystems honour it), released by the kernel when
    the holder dies, so a killed job never leaves a stale lock. The file names the holder, and
    is removed on a clean release; a directory this job created and left empty goes too.

    The holder is told apart by its kernel's boot id, its pid and the pid's start time (Holder),
    never by host name: a Kubernetes Indexed Job's replacement pod keeps the host name
    `<job>-<index>` of the pod it replaces, which may still hold the lock (frozen, or on a node
    whose NFS lease has not expired). A holder this process can see alive (same boot, its pid
    running since the same tick) is another job on this host: refused at once. Any other holder
    is waited for, up to `wait_s` (config run.lock_wait_s). Contention is a run-time condition either way
    (RunFailedError, exit 1: a retry may find the directory free), never bad input: a scheduler
    that fails a job for good on exit 2 (the Job's podFailurePolicy) must not do so here.
    """

    def __init__(self, run: RunDir, wait_s: float) -> None:
        """`wait_s`: seconds to wait for a holder this process cannot see before giving up (a lock
        held by a host that died lasts until its NFS lease expires, e.g. when a pod is replaced)."""
        self.run = run
        self.wait_s = wait_s
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        """Take the lock; creates the directory if needed. BadInputError naming the holder, or a
        symbolic link among the run directory's entries; a write that fails is one line that fits
        its errno (RunFailedError for a full disk, BadInputError otherwise)."""
        path = self.run.path
        if path.exists() and not path.is_dir():
            raise BadInputError(f"run.dir {path} is a file, not a directory; choose another run.dir")
        self._created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInputError(
                f"cannot write run directory {path} ({e.strerror}); set run.dir to a writable path"
            ) from None
        refuse_symlinks(self.run.written())
        deadline, waiting = time.monotonic() + self.wait_s, False
        while True:
            try:
                fd = self._open_locked()
            except OSError as e:
                raise BadInputError(
                    f"cannot write run directory {path} ({e.strerror}); set run.dir to a writable path"
                ) from None
            if fd is not None:
                break
            holder = self._holder()
            here = Holder.parse(holder)
            if (here is not None and here.alive_here()) or time.monotonic() > deadline:
                self._remove_if_created()
                raise RunFailedError(
                    f"run directory {path} is in use by another job ({holder or 'holder unknown'}); wait for it to "
                    "end, or pass run.name=<new name> (or run.dir=<new dir>)"
                )
            if not waiting:
                log.warning(
                    f"run directory {path} is locked by another job ({holder or 'holder unknown'}), on another host "
                    f"or an earlier boot: waiting up to {self.wait_s:g} s for it to end"
                )
                waiting = True
            time.sleep(2)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (Holder.this_process().describe() + "\n").encode())
        except OSError as e:
            self.release()
            raise write_error_kind(e)(
                f"cannot write {self.run.lock} ({e.strerror}); {write_fix(e)} and run the same command again"
            ) from None

    def release(self) -> None:
        """Let go of the lock, never raising: it runs in a `finally`, after what may be the error the
        user must see. The kernel drops the flock when the descriptor closes, so a `.lock` file
        that cannot be removed (a read-only or full disk by now) is only a leftover the next job
        locks and overwrites."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.run.lock.unlink(missing_ok=True)  # before unlocking: a waiter never locks a removed file
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        with contextlib.suppress(OSError):
            self._remove_if_created()

    def _open_locked(self) -> int | None:
        """A descriptor of `.lock` holding the lock, or None while another process holds it."""
        while True:
            fd = open_no_follow(self.run.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                if os.fstat(fd).st_ino == os.stat(self.run.lock).st_ino:
                    return fd
            except FileNotFoundError:  # the previous holder removed it as we locked: take a new one
                pass
            os.close(fd)

    def _holder(self) -> str:
        try:
            return self.run.lock.read_text().strip()[:300]
        except (OSError, UnicodeDecodeError):
            return ""

    def _remove_if_created(self) -> None:
        if self._created and self.run.path.is_dir() and not any(self.run.path.iterdir()):
            self.run.path.rmdir()


class CheckpointDir:
    """A run's checkpoints/: `step-<global step>.pt` files, the highest step the newest.

    Only rank 0 writes here. A new checkpoint is complete on disk before the oldest
    beyond `keep` is deleted, so a crash at any moment leaves at least one whole one.
    """

    _NAME = re.compile(r"^step-(\d{9})\.pt$")

    def __init__(self, path: Path) -> None:
        self.path = path

    def path_for(self, step: int) -> Path:
        return self.path / f"step-{step:09d}.pt"

    @classmethod
    def step_of(cls, path: Path) -> int | None:
        """The global step a checkpoint file was written after; None for a file that is not one."""
        match = cls._NAME.match(Path(path).name)
        return int(match.group(1)) if match else None

    def files(self) -> list[Path]:
        """Checkpoint files, oldest first (other files are not ours and are left alone)."""
        if not self.path.is_dir():
            return []
        steps = [(step, p) for p in self.path.iterdir() if (step := self.step_of(p)) is not None]
        return [p for _, p in sorted(steps)]

    def save(self, state: dict[str, Any], step: int, keep: int) -> Path:
        """Write `state` as the checkpoint of `step`, then delete all but the newest `keep`.
        RunFailedError when the disk refuses the write (the previous checkpoints stay)."""
        path = self.path_for(step)
        try:
            atomic_save(state, path)
        except OSError as e:
            raise RunFailedError(
                f"cannot write checkpoint {path} ({e.strerror or message_line(e)}); the previous checkpoints are "
                f"intact: {write_fix(e)} (or lower checkpoint.keep) and start the job again to resume"
            ) from None
        for old in self.files()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def remove_partial_writes(self) -> None:
        """Temporary files of a writer that died mid-write (never a checkpoint anyone reads)."""
        if self.path.is_dir():
            for tmp in self.path.glob(".step-*.tmp"):
                tmp.unlink(missing_ok=True)
