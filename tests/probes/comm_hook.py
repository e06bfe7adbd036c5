"""Run under torchrun (gloo). Each rank runs one backward pass of the net on its own batch
through DDP with job.collectives.mean_in_rank_order, and checks the gradients bit for bit
against the mean computed by hand (every rank's gradients over W, summed in rank order)
and, at 2 ranks, against DDP's own all-reduce. Exits 1 on the first difference.

It ends as the job does (job/process_exit.py): with the gloo group kept referenced and os._exit,
because a normal interpreter exit after destroy_process_group aborted 3-rank runs here 2 times in 6
("terminate called without an active exception", a gloo thread still running at teardown)."""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from job.collectives import mean_in_rank_order
from job.model import Net
from job.process_exit import exit_now, keep_until_exit


def gradients(hook: bool, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(1)
    model = Net(dropout=0.0)
    ddp = DistributedDataParallel(model)
    if hook:
        ddp.register_comm_hook(None, mean_in_rank_order)
    F.nll_loss(ddp(images), labels).backward()
    return [p.grad for p in model.parameters()]


dist.init_process_group("gloo")
keep_until_exit(dist.group.WORLD)
rank, world = dist.get_rank(), dist.get_world_size()
batch = torch.Generator().manual_seed(100 + rank)
images, labels = torch.randn(16, 1, 28, 28, generator=batch), torch.randint(0, 10, (16,), generator=batch)

torch.manual_seed(1)
local = Net(dropout=0.0)
F.nll_loss(local(images), labels).backward()
expected = []
for p in local.parameters():
    parts = [torch.empty_like(p.grad) for _ in range(world)]
    dist.all_gather(parts, p.grad / world)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    expected.append(total)

hooked = gradients(True, images, labels)
failures = [f"mean {i}" for i, (a, b) in enumerate(zip(hooked, expected, strict=True)) if not torch.equal(a, b)]
if world == 2:
    default = gradients(False, images, labels)
    pairs = enumerate(zip(hooked, default, strict=True))
    failures += [f"all-reduce {i}" for i, (a, b) in pairs if not torch.equal(a, b)]
dist.destroy_process_group()
if failures:
    print(f"rank {rank}: gradients differ for parameters {failures}", file=sys.stderr)
exit_now(1 if failures else 0)
