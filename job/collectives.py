"""Collectives the job runs over its process group: the DDP gradient hook, sums, the
agree-or-stop step for work done on some ranks, and rank 0's bytes or every rank's objects
moved across ranks (job/process_group.py starts the group)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from job.errors import JobError, PeerFailedError
from job.process_group import DistContext

T = TypeVar("T")


def mean_in_rank_order(state, bucket):  # unannotated: DDP rejects this module's string annotations
    """A DDP communication hook: the mean of a gradient bucket over ranks, through an all-gather
    and a sum in rank order instead of the backend's all-reduce.

    Why on every backend: an all-reduce's summation order for an element depends on where the
    element sits in the bucket (ring and tree algorithms split the buffer into chunks), and DDP
    rebuilds its buckets in gradient-ready order after the first step. A process that resumes
    from a checkpoint reduces its first step in the initial order, an uninterrupted one in the
    rebuilt order, so at 3+ ranks the bits could differ. Summed here element by element in rank
    order, each gradient's bits depend on neither. Like DDP's own hook it divides before summing,
    so at 2 ranks the bits equal the all-reduce's (a + b == b + a).

    Cost: gloo on loopback here (2 ranks, the net's 85 KB of gradients): all-reduce 1.7 ms,
    all-gather 0.6 ms, so it is also the faster one there. Under NCCL it moves W x 85 KB per
    step instead of about 2 x 85 KB: microseconds on NVLink or PCIe for this net.
    """
    tensor = bucket.buffer().div_(dist.get_world_size())
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    gathered = dist.all_gather(parts, tensor, async_op=True).get_future()

    def sum_in_rank_order(done: torch.futures.Future) -> torch.Tensor:
        # value() raises when the all-gather failed (a peer timed out or died), which fails this
        # future and so DDP's backward, at this step. `then` runs its callback on a failure too:
        # without it the never-filled `parts` were summed into the gradients, the live ranks went
        # on training on garbage until a collective outside the hook raised, steps later, and
        # the hang report named that later step (a SIGSTOPped rank, 3 ranks: step 20, not 17).
        done.value()
        total = parts[0]
        for part in parts[1:]:
            total += part
        return total

    return gathered.then(sum_in_rank_order)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op at world size 1 apart from the call)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def read_host(tensor: torch.Tensor) -> Any:
    """The values of a tensor that lives on the host by design (a control-group flag, the pinned copy
    of the loss), as Python numbers, read from its memory: never a device sync, and not the
    dispatcher's `_local_scalar_dense`, which the sync count (tests/test_syncs.py) takes for one.
    ValueError for a device tensor: reading one would wait for the device."""
    if tensor.device.type != "cpu":
        raise ValueError(f"read_host takes host tensors, not one on {tensor.device}")
    return tensor.tolist()


def on_some_ranks(ctx: DistContext, chosen: bool, step: str, action: Callable[[], T]) -> T | None:
    """`action()` on the chosen ranks only (fetching data, creating the run directory), then
    agree: if it failed anywhere, every rank stops instead of waiting for that rank forever.
    Returns what `action` returned on the chosen ranks, None on the others; a failure raises
    the JobError itself on the rank that hit it and PeerFailedError (same exit code) elsewhere."""
    result, error = None, None
    with ctx.at.during(step):
        if chosen:
            try:
                result = action()
            except JobError as e:
                error = e
        # The highest exit code of any rank (0: none failed): peers stop with the failed rank's code.
        # On the CPU control group: a device tensor here would cost a copy to the device and a sync back.
        code = torch.tensor([error.exit_code if error is not None else 0])
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=ctx.control_group)
        if error is not None:
            raise error
        (worst,) = read_host(code)
        if worst:
            raise PeerFailedError(f"another rank failed while {step}", exit_code=worst)
    return result


def broadcast_bytes(ctx: DistContext, data: bytes | None) -> bytes:
    """Rank 0's bytes on every rank (a checkpoint file, so that ranks on hosts without the
    shared volume resume too, and every rank loads it weights-only itself)."""
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=0, group=ctx.control_group)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if ctx.is_leader and data else None
    if buffer is None:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8)
    if buffer.numel():
        dist.broadcast(buffer, src=0, group=ctx.control_group)
    return buffer.numpy().tobytes()


def gather_to_leader(ctx: DistContext, obj: object) -> list[object] | None:
    """Every rank's `obj` on rank 0, in rank order (None on the other ranks)."""
    gathered: list[object] | None = [None] * ctx.world_size if ctx.is_leader else None
    dist.gather_object(obj, gathered, dst=0, group=ctx.control_group)
    return gathered
