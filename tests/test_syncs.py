"""No host-device synchronisation inside the training loop (issue 25): the job's own training steps,
at 1 and 2 ranks, counted by a dispatch mode (tests/probes/sync_count.py); checkpoint snapshots
in one copy from the device."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import assert_ok, run_probe, tiny_overrides
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from job.checkpoint import copy_to_host, to_cpu
from job.model import Net
from job.train import weights_in_place

LOOP = ("train.log_interval=3", "checkpoint.every_steps=5")
"""Log intervals and mid-epoch checkpoints inside the counted steps (the generated set has 8 steps an epoch)."""


def count_syncs(tiny_root, tmp_path, nproc: int, *extra: str) -> list[dict]:
    out = tmp_path / "syncs.json"
    args = [str(out), *tiny_overrides(tiny_root, tmp_path / "run", *LOOP), *extra]
    assert_ok(run_probe("sync_count.py", args, nproc=nproc))
    paths = [out, *(out.with_name(f"{out.name}.rank{rank}") for rank in range(1, nproc))]
    return [json.loads(path.read_text()) for path in paths]


@pytest.mark.processes
@pytest.mark.parametrize("nproc", [1, 2])
def test_training_steps_never_wait_for_the_device(tiny_root, tmp_path, nproc):
    """Every step, log intervals and stop votes included, runs without a .item() or a blocking
    copy to the host: only checkpoint writes and the epoch's end may wait (their own cadence)."""
    for rank, report in enumerate(count_syncs(tiny_root, tmp_path, nproc)):
        assert report["steps"] == 2 * 8, report  # both epochs counted
        in_steps = {f"{kind} {index}": n for kind, index, n in report["syncs"] if kind == "step"}
        assert not in_steps, f"rank {rank}: syncs inside training steps {in_steps}: {report['ops']}"


@pytest.mark.processes
def test_the_count_sees_an_item_added_inside_the_step(tiny_root, tmp_path):
    """The count can fail: one .item() of the loss per step shows up at every step."""
    (report,) = count_syncs(tiny_root, tmp_path, 1, "--add-item")
    in_steps = [n for kind, _, n in report["syncs"] if kind == "step"]
    assert len(in_steps) == report["steps"] == 2 * 8 and min(in_steps) >= 1, report["syncs"]


class DeviceToHostCopies(TorchDispatchMode):
    """Counts copies from a device to the host (under FakeTensorMode, "cuda" tensors need no GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device.type != "cpu":
            self.copies += torch.device(kwargs.get("device") or args[0].device).type == "cpu"
        if func is torch.ops.aten.copy_.default and args[1].device.type != "cpu":
            self.copies += args[0].device.type == "cpu"
        return func(*args, **kwargs)


def test_a_gpu_checkpoint_snapshot_is_one_copy_to_the_host():
    """The net's 8 weights and 8 momentum buffers (channels_last ones too) come over in one copy, not 16."""
    with FakeTensorMode():
        with torch.device("cuda"):
            net = Net()
            momentum = {i: {"momentum_buffer": channels_last(p.detach())} for i, p in enumerate(net.parameters())}
        count = DeviceToHostCopies()
        with count:
            weights, optimizer = to_cpu((weights_in_place(net), momentum))
    assert count.copies == 1
    assert (
        {t.device.type for t in weights.values()}
        == {"cpu"}
        == {t["momentum_buffer"].device.type for t in optimizer.values()}
    )
    assert all(t.is_contiguous() for t in weights.values())
    conv = optimizer[0]["momentum_buffer"]
    assert conv.dim() == 4 and conv.is_contiguous(memory_format=torch.channels_last), "the layout .cpu() keeps"


def channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """A momentum buffer as speed.channels_last leaves it for a convolution's weight."""
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor.clone()


def test_host_copies_equal_each_tensors_own_copy_to_the_byte():
    """Values, shapes, strides, dtypes and the saved file are those of a copy per tensor."""
    torch.manual_seed(0)
    tensors = [
        torch.randn(4, 3, 5, 5),
        torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last),
        torch.randn(7),
        torch.tensor(2.5),
        torch.arange(6, dtype=torch.int64).view(2, 3),
        torch.randn(3, 1),
    ]
    copies = copy_to_host(tensors)
    for tensor, copy in zip(tensors, copies, strict=True):
        assert torch.equal(tensor, copy) and tensor.dtype == copy.dtype and tensor.stride() == copy.stride()
        assert copy.untyped_storage().nbytes() == tensor.untyped_storage().nbytes()
    saved = [io.BytesIO(), io.BytesIO()]
    torch.save(copies, saved[0])
    torch.save([t.clone() for t in tensors], saved[1])
    assert saved[0].getvalue() == saved[1].getvalue()
