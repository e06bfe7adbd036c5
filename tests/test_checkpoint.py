"""Safe I/O: atomic writes leave the old file or the new one, loads never execute code."""

from __future__ import annotations

import os

import pytest
import torch

from job.errors import JobError
from job.model import model_state_of
from job.run_dir import CheckpointDir
from job.safe_io import atomic_save, atomic_write_text
from job.untrusted import load_weights_only, loads_weights_only


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(2)}, path)

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_save({"w": torch.zeros(2)}, path)
    assert torch.equal(load_weights_only(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mnist-ddp-pwned",))


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit()}, path)
    with pytest.raises(JobError, match="is not a weights-only file and was not loaded"):
        load_weights_only(path)


def test_truncated_and_garbage_files_are_refused(tmp_path):
    path = tmp_path / "m.pt"
    atomic_save({"w": torch.ones(1000), "step": 3}, path)
    whole = path.read_bytes()
    for cut in (10, 500, len(whole) // 2, len(whole) - 10):
        with pytest.raises(JobError, match="truncated or corrupt"):
            loads_weights_only(whole[:cut], "m.pt")
    path.write_bytes(whole[:500])
    with pytest.raises(JobError, match="truncated or corrupt"):
        load_weights_only(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(JobError, match="truncated or corrupt"):
        load_weights_only(path)
    with pytest.raises(JobError, match="does not exist"):
        load_weights_only(tmp_path / "missing.pt")


def test_model_state_of_model_file_or_checkpoint(tmp_path):
    state = {"w": torch.ones(1)}
    assert model_state_of(state, "m.pt") is state
    assert model_state_of({"model": state, "epoch": 3}, "c.pt") is state
    with pytest.raises(JobError, match="holds no model state_dict"):
        model_state_of({"epoch": 3}, "c.pt")


def test_checkpoint_dir_keeps_the_newest_and_ignores_other_files(tmp_path):
    checkpoints = CheckpointDir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    for step in (5, 100, 20, 7):
        checkpoints.save({"step": step}, step, keep=3)
    assert [p.name for p in checkpoints.files()] == ["step-000000007.pt", "step-000000020.pt", "step-000000100.pt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / ".step-000000101.pt.abc.tmp").write_bytes(b"half")
    checkpoints.remove_partial_writes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", *[p.name for p in checkpoints.files()]]


def test_a_full_disk_fails_the_checkpoint_in_one_line_and_keeps_the_others(tmp_path, monkeypatch):
    checkpoints = CheckpointDir(tmp_path)
    checkpoints.save({"step": 1}, 1, keep=3)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(JobError, match=r"cannot write checkpoint .*step-000000002.pt \(No space left on device\)"):
        checkpoints.save({"step": 2}, 2, keep=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000001.pt"]
