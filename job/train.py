"""The loop: data and run directory prepared once, DDP training, exact distributed evaluation.

Read top to bottom it is the tutorial's recipe: build the net, then for each epoch
train over the shuffled training set and test on the full test set.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from job import data
from job.checkpoint import atomic_save, atomic_write_json, atomic_write_text, load_weights_only, model_state_from
from job.config import Config, dump_config, rank_batch_size
from job.console import ProgressBar, get_logger, setup_logging
from job.dist import DistContext, all_reduce_sum, distributed, on_some_ranks, read_launch_env
from job.errors import JobError, message_line
from job.metrics import Metrics, NullMetrics, digit_grid
from job.model import Net
from job.seeding import configure_determinism, seed_parameter_init, seed_rank_streams

FIGURE_DIGITS = 6
"""Test digits drawn with label and prediction, as in the tutorial's figure."""


def prepare_data(cfg: Config, ctx: DistContext, log: logging.Logger, splits: tuple[str, ...]) -> dict[str, data.Split]:
    """Fetch (once per host, the other local ranks wait) and load the requested splits on every rank."""
    fetch = functools.partial(data.ensure_mnist, cfg.data.root, cfg.data.download, cfg.data.verify, log=log.info)
    on_some_ranks(ctx, ctx.is_local_leader, "preparing MNIST", fetch)
    limits = {"train": cfg.data.train_limit, "test": None}
    return {split: data.load_split(cfg.data.root, split, limits[split]) for split in splits}


def check_run_dir_is_free(run_dir: Path) -> None:
    """Refuse a run directory that holds anything: earlier results are never overwritten."""
    if run_dir.exists() and not run_dir.is_dir():
        raise JobError(f"run.dir {run_dir} is a file, not a directory; choose another run.dir")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        held = ", ".join(sorted(p.name for p in run_dir.iterdir())[:4])
        raise JobError(
            f"run directory {run_dir} is not empty (holds {held}); pass run.name=<new name> or "
            "run.dir=<new dir>, or delete it to start over"
        )


def create_run_dir(cfg: Config) -> None:
    """The run directory with its resolved config.yaml and an empty checkpoints/."""
    run_dir = cfg.run_dir
    check_run_dir_is_free(run_dir)  # again: the data step may have taken minutes
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    except OSError as e:
        raise JobError(f"cannot write run directory {run_dir} ({e.strerror}); set run.dir to a writable path") from None


def evaluate(model: torch.nn.Module, split: data.Split, ctx: DistContext, batch_size: int) -> dict[str, Any]:
    """Exact test figures at any world size: each rank scores a disjoint, unpadded shard and
    the sums (loss, correct, count) are added over ranks."""
    shard = data.test_shard(len(split), ctx.rank, ctx.world_size)
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    model.eval()
    with torch.no_grad():
        for start in range(shard.start, shard.stop, batch_size):
            stop = min(start + batch_size, shard.stop)
            images = split.images[start:stop].to(ctx.device, non_blocking=True)
            labels = split.labels[start:stop].to(ctx.device, non_blocking=True)
            output = model(images)
            sums[0] += F.nll_loss(output, labels, reduction="sum").double()
            sums[1] += (output.argmax(dim=1) == labels).sum()
            sums[2] += len(labels)
    loss_sum, correct, count = all_reduce_sum(sums).tolist()
    return {
        "test_loss": loss_sum / count,
        "test_accuracy": correct / count,
        "correct": int(correct),
        "count": int(count),
    }


def build_ddp_model(cfg: Config, ctx: DistContext) -> tuple[Net, DistributedDataParallel]:
    """The tutorial's net on this rank's device and its DDP wrapper. Every rank builds the same
    initial weights; afterwards the global generator is this rank's own (dropout) stream."""
    seed_parameter_init(cfg.seed)
    model = Net(dropout=cfg.model.dropout).to(ctx.device)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids)
    seed_rank_streams(cfg.seed, ctx.rank)
    return model, ddp


class Trainer:
    """The model, its optimizer and the position in training, for one rank."""

    def __init__(self, cfg: Config, ctx: DistContext, splits: dict[str, data.Split]) -> None:
        self.cfg, self.ctx, self.run_dir = cfg, ctx, cfg.run_dir
        self.train_split, self.test_split = splits["train"], splits["test"]
        self.log = get_logger()
        self.rank_batch = rank_batch_size(cfg.data.global_batch_size, ctx.world_size)
        self.sampler = data.train_sampler(len(self.train_split), ctx.rank, ctx.world_size, cfg.seed)
        repeated = -len(self.train_split) % ctx.world_size
        if repeated and ctx.is_leader:
            self.log.warning(
                f"{len(self.train_split)} training samples do not split evenly over {ctx.world_size} ranks: "
                f"{repeated} sample(s) repeat each epoch (DistributedSampler pads the shards), so this run is "
                "not step-for-step equal to a 1-rank run; pick data.train_limit divisible by the world size"
            )

        self.model, self.ddp = build_ddp_model(cfg, ctx)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)

        self.epoch = 0
        self.global_step = 0
        self.train_seconds = 0.0
        self.samples_trained = 0
        self.metrics = Metrics(self.run_dir) if ctx.is_leader else NullMetrics()

    def fit(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        try:
            for epoch in range(1, self.cfg.train.epochs + 1):
                self.epoch = epoch
                self.train_epoch(epoch)
                result = self.test(epoch)
                if self.ctx.is_leader:
                    atomic_save(self.state_dict(), self.run_dir / "checkpoints" / f"epoch-{epoch:04d}.pt")
            summary = self.summary(result)
            if self.ctx.is_leader:
                atomic_save(self.model.state_dict(), self.run_dir / "model.pt")
                atomic_write_json(self.run_dir / "summary.json", summary)
            return summary
        finally:
            self.metrics.close()

    def train_epoch(self, epoch: int) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.sampler.set_epoch(epoch - 1)  # a new shuffle every epoch, the same on every rank
        num_batches = data.num_train_batches(self.sampler, self.rank_batch)
        dataset_size = len(self.train_split)
        bar = ProgressBar(num_batches, f"Epoch {epoch}", enabled=ctx.is_leader)
        self.ddp.train()
        samples_before, start = self.samples_trained, time.perf_counter()
        for batch_idx, (images, labels) in enumerate(
            data.train_batches(self.train_split, self.sampler, self.rank_batch)
        ):
            images = images.to(ctx.device, non_blocking=True)
            labels = labels.to(ctx.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.nll_loss(self.ddp(images), labels)
            loss.backward()
            self.optimizer.step()
            self.global_step += 1
            # Every rank's batch is the same size, so the mean of rank means is the global batch mean.
            self.samples_trained += len(labels) * ctx.world_size
            bar.update()
            if batch_idx % cfg.train.log_interval == 0:
                mean_loss = all_reduce_sum(loss.detach().clone()).item() / ctx.world_size
                done = min(batch_idx * cfg.data.global_batch_size, dataset_size)
                bar.clear()
                self.log.info(
                    f"Train Epoch: {epoch} [{done}/{dataset_size} ({100.0 * batch_idx / num_batches:.0f}%)]"
                    f"  Loss: {mean_loss:.6f}"
                )
                examples_seen = (epoch - 1) * dataset_size + done
                self.metrics.train_step(self.global_step, epoch, examples_seen, mean_loss, cfg.optim.lr)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        seconds = time.perf_counter() - start
        bar.clear()
        self.train_seconds += seconds
        self.metrics.train_epoch(self.global_step, epoch, (self.samples_trained - samples_before) / seconds)

    def test(self, epoch: int) -> dict[str, Any]:
        result = evaluate(self.model, self.test_split, self.ctx, self.cfg.data.test_batch_size)
        self.log.info(
            f"Test set: Avg. loss: {result['test_loss']:.4f}, Accuracy: {result['correct']}/{result['count']} "
            f"({100.0 * result['test_accuracy']:.2f}%)"
        )
        digits = self._figure_digits() if self.ctx.is_leader else None
        self.metrics.test(self.global_step, epoch, result, digits)
        return result

    def _figure_digits(self) -> torch.Tensor:
        images = self.test_split.images[:FIGURE_DIGITS]
        with torch.no_grad():
            predictions = self.model(images.to(self.ctx.device)).argmax(dim=1).cpu()
        return digit_grid(data.denormalize(images), self.test_split.labels[:FIGURE_DIGITS], predictions)

    def state_dict(self) -> dict[str, Any]:
        """Everything about training so far that a checkpoint keeps (optimizer momentum included)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "world_size": self.ctx.world_size,
        }

    def summary(self, result: dict[str, Any]) -> dict[str, Any]:
        return {
            **result,
            "world_size": self.ctx.world_size,
            "epochs": self.epoch,
            "global_step": self.global_step,
            "samples_trained": self.samples_trained,
            "train_seconds": self.train_seconds,
            "train_samples_per_second": self.samples_trained / self.train_seconds,
            "backend": self.ctx.backend,
            "device": self.ctx.device.type,
            "launcher": self.ctx.env.launcher,
            "torch": torch.__version__,
        }


def run_training(cfg: Config) -> dict[str, Any]:
    """`python -m job train`: the whole job on this rank; returns the summary."""
    env = read_launch_env()
    rank_batch_size(cfg.data.global_batch_size, env.world_size)  # before any side effect
    configure_determinism(cfg.deterministic)
    with distributed(cfg.dist, env) as ctx:
        log = setup_logging(ctx.rank, ctx.world_size)
        log.info(
            f"Training on {ctx.world_size} rank(s), backend {ctx.backend}, device {ctx.device.type}, "
            f"{torch.get_num_threads()} thread(s) per rank, run directory {cfg.run_dir}"
        )
        # Checked before the data step (which may download for minutes), created after it,
        # so bad input never leaves a half-made run directory behind.
        on_some_ranks(ctx, ctx.is_leader, "checking the run directory", lambda: check_run_dir_is_free(cfg.run_dir))
        splits = prepare_data(cfg, ctx, log, splits=("train", "test"))
        on_some_ranks(ctx, ctx.is_leader, "creating the run directory", lambda: create_run_dir(cfg))
        summary = Trainer(cfg, ctx, splits).fit()
        log.info(f"Done: test accuracy {summary['test_accuracy']:.4f}, results in {cfg.run_dir}")
        return summary


def run_evaluation(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """`python -m job evaluate`: exact test figures of a saved model, at any world size."""
    env = read_launch_env()
    state = model_state_from(load_weights_only(checkpoint), checkpoint)
    model = Net(dropout=cfg.model.dropout)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # the last line names the first mismatching key and shapes
        raise JobError(f"checkpoint {checkpoint} does not fit the model: {message_line(e, last=True)}") from None
    configure_determinism(cfg.deterministic)
    with distributed(cfg.dist, env) as ctx:
        log = setup_logging(ctx.rank, ctx.world_size)
        splits = prepare_data(cfg, ctx, log, splits=("test",))
        return evaluate(model.to(ctx.device), splits["test"], ctx, cfg.data.test_batch_size)
