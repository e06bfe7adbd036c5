"""Counts, in every Python process started with this folder first on PYTHONPATH, each read of a
checkpoint file and each torch.load: one JSON line per event appended to $CHECKPOINT_READS_LOG
(test_resume.py::test_a_resume_reads_and_unpickles_each_checkpoint_once_per_process).

Opens are seen through Python's audit hook (builtins.open and os.open both raise "open"); torch.load
is wrapped once torch has been imported by the job itself, so the job imports torch when it always
does (after pinning its CPU kernels). Nothing else changes: every call goes on to the real one.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import io
import json
import os
import re
import sys

_LOG = os.environ.get("CHECKPOINT_READS_LOG")
_CHECKPOINT = re.compile(r"step-\d{9}\.pt$")


def _record(kind: str, what: str) -> None:
    line = json.dumps({"rank": os.environ.get("RANK"), "pid": os.getpid(), "kind": kind, "what": what}) + "\n"
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _on_audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if _CHECKPOINT.search(path) and not (args[2] or 0) & (os.O_WRONLY | os.O_RDWR) and "w" not in (args[1] or ""):
            _record("open", os.path.basename(path))


def _wrap_load(torch) -> None:  # noqa: ANN001
    real = torch.load

    def load(f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if isinstance(f, io.BytesIO):  # the job's way: the file's bytes, read once
            _record("unpickle", hashlib.sha256(f.getvalue()).hexdigest())
        else:  # a path (its open is counted too) or another file object
            _record("unpickle", os.path.basename(os.fsdecode(f)) if isinstance(f, (str, os.PathLike)) else repr(f))
        return real(f, *args, **kwargs)

    torch.load = load


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Finds torch as the next finder would, and wraps torch.load once the module has run."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            run(module)
            _wrap_load(module)

        spec.loader.exec_module = exec_module
        return spec


if _LOG:
    sys.addaudithook(_on_audit)
    sys.meta_path.insert(0, _AfterTorch())
