"""Files that must never be half-written (reading untrusted files: job/untrusted.py).

A reader sees either the previous file or the complete new one: bytes go to a temporary
file in the same directory, are fsynced, then renamed over the target (rename is atomic
on POSIX), and the directory is fsynced so the rename itself survives a crash. A crash
mid-write leaves only a hidden `.<name>.<random>.tmp` file, which the next writer of that
directory may remove.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch


def _create_temp(target: Path) -> tuple[Path, int]:
    """A new hidden file beside `target`, open for writing. Created with mode 0666 so the
    kernel applies the process's umask, as for any other file the run writes (mkstemp's
    0600 would hide checkpoints from the run directory's other readers)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:  # 48 random bits: practically never
            continue


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably; OSError (a full disk, no permission) leaves
    the previous file and no temporary one."""
    path = Path(path)
    tmp, fd = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
