"""Run under torchrun (gloo), any number of ranks: ARGS = out.json, then the job's train overrides,
then optionally --add-item. Trains with the job's own run_training under a TorchDispatchMode that
counts host-device synchronisations, and writes to out.json (rank 0) / out.json.rankN what each
training step did, keyed by batch index: the syncs of the loop's own work, and apart from them
those of checkpoint writes (their own cadence) and of the code after the loop (the epoch end).

What counts as a synchronisation: `aten._local_scalar_dense` (what .item(), float(), int() and
bool() of a tensor call: on a GPU the host waits for the device) on any tensor, since on the CPU
there is no other way to tell a device read apart, and a blocking copy from a device to the host.
The job reads its host-by-design tensors (control-group flags, the pinned copy of the loss) with
job.collectives.read_host, which goes through neither.

--add-item adds a `.item()` of the loss inside Trainer.step: the count must then see one per step.
"""

import json
import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from job import data, train
from job.config import load_config
from job.process_exit import exit_now

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class SyncCount(TorchDispatchMode):
    """Host-device synchronisations, by where the loop stood: ("step", batch index),
    ("checkpoint", batch index), or ("after the loop", epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: tuple[str, int] | None = None
        self.syncs: Counter[tuple[str, int]] = Counter()
        self.ops: dict[str, list[str]] = {}
        self.steps = 0
        """Training steps the count covered."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.where is not None and is_sync(func, args, kwargs):
            self.syncs[self.where] += 1
            self.ops.setdefault(f"{self.where[0]} {self.where[1]}", []).append(str(func))
        return func(*args, **kwargs)


def is_sync(func, args, kwargs) -> bool:
    if func is _SCALAR_READ:
        return True
    if func is torch.ops.aten._to_copy.default:
        source, target = args[0].device, kwargs.get("device") or args[0].device
        return source.type != "cpu" and torch.device(target).type == "cpu" and not kwargs.get("non_blocking")
    if func is torch.ops.aten.copy_.default:
        target, source = args[0], args[1]
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return source.device.type != "cpu" and target.device.type == "cpu" and (blocking or not target.is_pinned())
    return False


counter = SyncCount()
add_item = "--add-item" in sys.argv
out, *overrides = [arg for arg in sys.argv[1:] if arg != "--add-item"]

batches, epochs = data.train_batches, {"n": 0}


def counted_batches(*args, **kwargs):
    """The loop's batches: each yield starts the next step's count; the end starts "after the loop"."""
    epochs["n"] += 1
    skip = kwargs.get("skip", args[3] if len(args) > 3 else 0)
    for index, batch in enumerate(batches(*args, **kwargs), start=skip):
        counter.where = ("step", (epochs["n"] - 1) * 1000 + index)  # epoch e's batch i: (e-1)*1000 + i
        counter.steps += 1
        yield batch
    counter.where = ("after the loop", epochs["n"])


data.train_batches = counted_batches
save_checkpoint = train.Trainer.save_checkpoint


def counted_save(self):
    where, counter.where = counter.where, ("checkpoint", counter.where[1] if counter.where else -1)
    try:
        return save_checkpoint(self)
    finally:
        counter.where = where


train.Trainer.save_checkpoint = counted_save
if add_item:
    step = train.Trainer.step

    def step_with_item(self, images, labels):
        loss = step(self, images, labels)
        loss.item()  # the sync the count must catch
        return loss

    train.Trainer.step = step_with_item

with counter:
    train.run_training(load_config(overrides=overrides))
rank = int(os.environ.get("RANK", "0"))
report = {
    "steps": counter.steps,
    "syncs": [[kind, index, n] for (kind, index), n in sorted(counter.syncs.items())],
    "ops": counter.ops,
}
with open(out if rank == 0 else f"{out}.rank{rank}", "w") as f:
    json.dump(report, f)
exit_now(0)
