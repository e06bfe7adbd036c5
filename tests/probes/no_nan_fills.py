"""Run under torchrun (gloo), any number of ranks. Trains the job's net for 30 DDP steps (dropout on,
SGD with momentum, the job's gradient hook `mean_in_rank_order`) twice from the same seeds in
deterministic mode: once with torch's NaN fills of new tensors
(torch.utils.deterministic.fill_uninitialized_memory) and once as `configure_numerics` leaves it,
without them. Exits 1 if any weight differs by a bit, or if configure_numerics left the fills on.

It ends as the job does (job/process_exit.py): the gloo group kept referenced, then os._exit.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from job.dist import mean_in_rank_order
from job.model import Net
from job.process_exit import exit_now, keep_until_exit
from job.seeding import configure_numerics

STEPS = 30


def train(fills: bool, rank: int) -> list[torch.Tensor]:
    configure_numerics(deterministic=True, tf32=False)
    torch.utils.deterministic.fill_uninitialized_memory = fills
    torch.manual_seed(1)
    model = Net()
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, mean_in_rank_order)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    data = torch.Generator().manual_seed(100 + rank)
    torch.manual_seed(1000 + rank)  # the dropout masks, per rank as in the job
    for _ in range(STEPS):
        images, labels = torch.randn(32, 1, 28, 28, generator=data), torch.randint(0, 10, (32,), generator=data)
        optimizer.zero_grad()
        F.nll_loss(ddp(images), labels).backward()
        optimizer.step()
    return [t.detach().clone() for t in model.state_dict().values()]


dist.init_process_group("gloo")
keep_until_exit(dist.group.WORLD)
rank = dist.get_rank()
configure_numerics(deterministic=True, tf32=False)
problems = []
if torch.utils.deterministic.fill_uninitialized_memory:
    problems.append("configure_numerics(deterministic=True) left torch's NaN fills on")
with_fills, without = train(True, rank), train(False, rank)
differ = [i for i, (a, b) in enumerate(zip(with_fills, without, strict=True)) if not torch.equal(a, b)]
if differ:
    problems.append(f"weights {differ} differ between runs with and without the NaN fills after {STEPS} steps")
dist.destroy_process_group()
for problem in problems:
    print(f"rank {rank}: {problem}", file=sys.stderr)
exit_now(1 if problems else 0)
