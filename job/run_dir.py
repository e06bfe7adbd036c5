"""The run directory's contract: every file a run writes there, named once (README: "The run directory").

Training (rank 0 only) writes config.yaml, metrics.jsonl, tb/, checkpoints/ (and mlflow_run.json
when tracking), then model.pt and summary.json at the end; `python -m job plot` writes plots/.
The job, the tools and the tests all find these files through RunDir.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from job.checkpoint import CheckpointDir
from job.errors import BadInputError


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

    def contents(self) -> list[Path]:
        """What the directory holds, the running job's lock aside."""
        return [p for p in self.path.iterdir() if p != self.lock] if self.path.is_dir() else []

    def results(self) -> list[Path]:
        """The files only a finished (or once-finished) run leaves: with no checkpoint beside
        them, they are results a fresh start would silently overwrite."""
        return [path for path in (self.model, self.summary) if path.exists()]


class RunDirLock:
    """Rank 0's exclusive hold on a run directory for the whole run, so that two jobs started on
    one directory cannot overwrite each other's checkpoints and results.

    An flock(2) on `.lock` (NFSv4 and local filesystems honour it), released by the kernel when
    the holder dies, so a killed job never leaves a stale lock. The file names the holder, and
    is removed on a clean release; a directory this job created and left empty goes too.
    """

    WAIT_FOR_OTHER_HOSTS_S = 120
    """How long to wait for a holder on another host before giving up: a lock held by a host that
    died lasts until its NFS lease expires (90 s by default), e.g. when a pod is replaced."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        """Take the lock or raise BadInputError naming the holder; creates the directory if needed."""
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
        deadline = time.monotonic() + self.WAIT_FOR_OTHER_HOSTS_S
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
            if f" on {socket.gethostname()} since " in holder or time.monotonic() > deadline:
                self._remove_if_created()
                raise BadInputError(
                    f"run directory {path} is in use by another job ({holder or 'holder unknown'}); wait for it to "
                    "end, or pass run.name=<new name> (or run.dir=<new dir>)"
                )
            time.sleep(2)
        os.ftruncate(fd, 0)
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        )
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.run.lock.unlink(missing_ok=True)  # before unlocking: a waiter never locks a removed file
        os.close(self._fd)
        self._fd = None
        self._remove_if_created()

    def _open_locked(self) -> int | None:
        """A descriptor of `.lock` holding the lock, or None while another process holds it."""
        while True:
            fd = os.open(self.run.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
            return self.run.lock.read_text().strip()[:200]
        except OSError:
            return ""

    def _remove_if_created(self) -> None:
        if self._created and self.run.path.is_dir() and not any(self.run.path.iterdir()):
            self.run.path.rmdir()
