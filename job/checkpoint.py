"""Files that must never be half-written: atomic writes, loading that executes nothing, and
the run's checkpoints/ directory.

A reader of the run directory sees either the previous file or the complete new
one: bytes go to a temporary file in the same directory, are fsynced, then renamed
over the target (rename is atomic on POSIX), and the directory is fsynced so the
rename itself survives a crash. A crash mid-write leaves only a hidden temporary
file, which the next writer removes.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from job.errors import JobError, RunFailedError, message_line

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, the run directory's readers need the usual mode


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save, atomically: serialised in memory first (checkpoints here are small)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_weights_only(path: str | Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"checkpoint {path} does not exist; pass the path of a model.pt or checkpoint file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JobError(f"checkpoint {path} cannot be read ({e.strerror})") from None
    return loads_weights_only(data, path)


def loads_weights_only(data: bytes, name: str | Path) -> Any:
    """load_weights_only for a file's bytes (as rank 0 broadcasts them); `name` is for messages."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps the one line that matters in paragraphs of advice: keep that line.
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        details = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith(boilerplate)]
        reason = details[0] if details else "unreadable pickle"
        if "GLOBAL" in reason:
            raise JobError(f"checkpoint {name} is not a weights-only file and was not loaded ({reason})") from None
        raise JobError(f"checkpoint {name} is truncated or corrupt ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise JobError(f"checkpoint {name} is truncated or corrupt ({message_line(e)})") from None


def model_state_from(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state_dict from a loaded model.pt (a state_dict) or a training checkpoint."""
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise JobError(f"checkpoint {path} holds no model state_dict; pass a model.pt or checkpoint file")
    return state


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

    def files(self) -> list[Path]:
        """Checkpoint files, oldest first (other files are not ours and are left alone)."""
        if not self.path.is_dir():
            return []
        named = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := self._NAME.match(p.name))]
        return [p for _, p in sorted(named)]

    def save(self, state: dict[str, Any], step: int, keep: int) -> Path:
        path = self.path_for(step)
        try:
            atomic_save(state, path)
        except OSError as e:
            raise RunFailedError(
                f"cannot write checkpoint {path} ({e.strerror or message_line(e)}); the previous checkpoints are "
                "intact: free space there (or lower checkpoint.keep) and start the job again to resume"
            ) from None
        for old in self.files()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def remove_partial_writes(self) -> None:
        """Temporary files of a writer that died mid-write (never a checkpoint anyone reads)."""
        if self.path.is_dir():
            for tmp in self.path.glob(".step-*.tmp"):
                tmp.unlink(missing_ok=True)
