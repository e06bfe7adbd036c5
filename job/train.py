"""The loop: data and run directory prepared once, DDP training, exact distributed evaluation.

Read top to bottom it is the tutorial's recipe: build the net, then for each epoch
train over the shuffled training set and test on the full test set.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from job import data
from job.checkpoint import (
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    loads_weights_only,
)
from job.config import Config, dump_config, rank_batch_size, resume_recipe
from job.console import ProgressBar, get_logger, setup_logging
from job.dist import (
    DistContext,
    all_reduce_sum,
    broadcast_bytes,
    distributed,
    gather_to_leader,
    gloo_mean_by_all_gather,
    on_some_ranks,
    peer_lost_error,
    read_launch_env,
)
from job.errors import ConfigError, JobError, PreemptedError
from job.metrics import Metrics, NullMetrics, digit_grid
from job.model import Net, load_model
from job.preemption import STOP_VOTE_EVERY_STEPS, StopRequest, StopVote
from job.resume import CHECKPOINT_FORMAT, ResumeSource, checkpoint_dir, find_resume_source, recipe_digest
from job.seeding import (
    configure_determinism,
    reseed_rank_streams_after_resize,
    restore_rng_state,
    rng_state,
    seed_parameter_init,
    seed_rank_streams,
)

FIGURE_DIGITS = 6
"""Test digits drawn with label and prediction, as in the tutorial's figure."""


def prepare_data(cfg: Config, ctx: DistContext, log: logging.Logger, splits: tuple[str, ...]) -> dict[str, data.Split]:
    """Fetch (once per host, the other local ranks wait) and load the requested splits on every rank."""
    fetch = functools.partial(data.ensure_mnist, cfg.data.root, cfg.data.download, cfg.data.verify, log=log.info)
    on_some_ranks(ctx, ctx.is_local_leader, "preparing MNIST", fetch)
    limits = {"train": cfg.data.train_limit, "test": None}
    loaded = {split: data.load_split(cfg.data.root, split, limits[split]) for split in splits}
    if cfg.speed.data_on_device:  # batches are then gathered on the device: no host-to-device copy per step
        loaded = {name: split.to(ctx.device) for name, split in loaded.items()}
    return loaded


def prepare_run_dir(cfg: Config, resuming: bool) -> None:
    """Rank 0, once the start is decided and the data is ready: the run directory with the
    resolved config.yaml and checkpoints/ (minus the temporary file of a writer that died)."""
    run_dir, checkpoints = cfg.run_dir, checkpoint_dir(cfg)
    if not resuming and checkpoints.files():  # appeared during the data step: another job writes here
        raise JobError(f"run directory {run_dir} gained checkpoints while this job started; is another job using it?")
    try:
        checkpoints.path.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_partial_writes()
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


def build_train_model(cfg: Config, ctx: DistContext) -> tuple[Net, torch.nn.Module]:
    """The tutorial's net on this rank's device, and what the training step calls: its DDP
    wrapper (a single rank has nothing to average: the net itself, the same bits without
    DDP's per-step bookkeeping), compiled if asked. Every rank builds the same initial
    weights; afterwards the global generator is this rank's own (dropout) stream."""
    seed_parameter_init(cfg.seed)
    model = Net(dropout=cfg.model.dropout).to(ctx.device)
    if cfg.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model: torch.nn.Module = model
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        step_model = DistributedDataParallel(model, device_ids=device_ids)
        if ctx.backend == "gloo":
            step_model.register_comm_hook(None, gloo_mean_by_all_gather)
    if cfg.speed.compile:
        step_model = torch.compile(step_model)
    seed_rank_streams(cfg.seed, ctx.rank)
    return model, step_model


class Trainer:
    """The model, its optimizer and the position in training, for one rank."""

    def __init__(self, cfg: Config, ctx: DistContext, splits: dict[str, data.Split]) -> None:
        self.cfg, self.ctx, self.run_dir = cfg, ctx, cfg.run_dir
        self.train_split, self.test_split = splits["train"], splits["test"]
        self.log = get_logger()
        self.rank_batch = rank_batch_size(cfg.data.global_batch_size, ctx.world_size)
        self.sampler = data.train_sampler(len(self.train_split), ctx.rank, ctx.world_size, cfg.seed)
        self.num_batches = data.num_train_batches(self.sampler, self.rank_batch)
        repeated = -len(self.train_split) % ctx.world_size
        if repeated and ctx.is_leader:
            self.log.warning(
                f"{len(self.train_split)} training samples do not split evenly over {ctx.world_size} ranks: "
                f"{repeated} sample(s) repeat each epoch (DistributedSampler pads the shards), so this run is "
                "not step-for-step equal to a 1-rank run; pick data.train_limit divisible by the world size"
            )

        self.model, self.step_model = build_train_model(cfg, ctx)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
        self.checkpoints = checkpoint_dir(cfg)

        # The position: epochs_done whole epochs, then batches_done batches of the next one.
        self.epochs_done = 0
        self.batches_done = 0
        self.global_step = 0
        self.samples_trained = 0
        self.train_seconds = 0.0
        self.resumes = 0
        self.resumed_from: tuple[str, int] | None = None  # (checkpoint, its world size)
        self.metrics: NullMetrics = NullMetrics()

    def fit(self) -> dict[str, Any]:
        if self.ctx.is_leader:
            self.metrics = Metrics(self.run_dir, start_step=self.global_step)
            if self.resumed_from:
                name, world_size = self.resumed_from
                self.metrics.resume(self.global_step, self.epochs_done + 1, name, self.ctx.world_size, world_size)
        try:
            result = None
            with StopRequest() as stop:
                while self.epochs_done < self.cfg.train.epochs:
                    epoch = self.epochs_done + 1
                    self.train_epoch(epoch, stop)
                    self.epochs_done, self.batches_done = epoch, 0
                    result = self.test(epoch)
                    self.save_checkpoint()
            if result is None:  # resumed a run that had finished its epochs: figures for the summary
                self.log.info(f"All {self.epochs_done} epochs were trained already: writing the final results")
                result = evaluate(self.model, self.test_split, self.ctx, self.cfg.data.test_batch_size)
            summary = self.summary(result)
            if self.ctx.is_leader:
                atomic_save(self.model_state(), self.run_dir / "model.pt")
                atomic_write_json(self.run_dir / "summary.json", summary)
            return summary
        finally:
            self.metrics.close()

    def train_epoch(self, epoch: int, stop: StopRequest) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.sampler.set_epoch(epoch - 1)  # a new shuffle every epoch, the same on every rank
        dataset_size, every = len(self.train_split), cfg.checkpoint.every_steps
        skip = self.batches_done  # non-zero only in the epoch a resume lands in
        bar = ProgressBar(self.num_batches - skip, f"Epoch {epoch}", enabled=ctx.is_leader)
        self.step_model.train()
        samples_before, checkpoint_seconds, start = self.samples_trained, 0.0, time.perf_counter()
        batches = data.train_batches(self.train_split, self.sampler, self.rank_batch, skip=skip)
        for batch_idx, (images, labels) in enumerate(batches, start=skip):
            vote_due = (self.global_step + 1) % STOP_VOTE_EVERY_STEPS == 0 or batch_idx + 1 == self.num_batches
            vote = StopVote(ctx, stop) if vote_due else None
            images = images.to(ctx.device, non_blocking=True)
            labels = labels.to(ctx.device, non_blocking=True)
            if cfg.speed.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                output = self.step_model(images)
            loss = F.nll_loss(output.float(), labels)  # CPU autocast leaves log_softmax in bf16
            loss.backward()
            self.optimizer.step()
            self.global_step += 1
            self.batches_done = batch_idx + 1
            # Every rank's batch is the same size, so the mean of rank means is the global batch mean.
            self.samples_trained += len(labels) * ctx.world_size
            bar.update()
            if batch_idx % cfg.train.log_interval == 0:
                mean_loss = all_reduce_sum(loss.detach().clone()).item() / ctx.world_size
                done = min(batch_idx * cfg.data.global_batch_size, dataset_size)
                bar.clear()
                self.log.info(
                    f"Train Epoch: {epoch} [{done}/{dataset_size} ({100.0 * batch_idx / self.num_batches:.0f}%)]"
                    f"  Loss: {mean_loss:.6f}"
                )
                examples_seen = (epoch - 1) * dataset_size + done
                self.metrics.train_step(self.global_step, epoch, examples_seen, mean_loss, cfg.optim.lr)
            # All ranks vote after the same steps, so they all stop after the same one.
            stopping = vote is not None and vote.any_rank_stopping()
            if stopping or (every and self.global_step % every == 0 and self.batches_done < self.num_batches):
                checkpoint_seconds += self.save_checkpoint()
            if stopping:
                bar.clear()
                self.log.warning(f"SIGTERM: stopping after step {self.global_step}, checkpoint written")
                raise PreemptedError(
                    f"stopped by SIGTERM after step {self.global_step} (epoch {epoch}, batch {self.batches_done}/"
                    f"{self.num_batches}) and wrote {self.checkpoints.path_for(self.global_step)}; start the job "
                    "again to resume"
                )
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        seconds = time.perf_counter() - start - checkpoint_seconds
        bar.clear()
        self.train_seconds += seconds
        self.metrics.train_epoch(self.global_step, epoch, (self.samples_trained - samples_before) / seconds)

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast of the forward pass when speed.bf16 is on: convolutions and matmuls in bf16."""
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.cfg.speed.bf16)

    def test(self, epoch: int) -> dict[str, Any]:
        result = evaluate(self.model, self.test_split, self.ctx, self.cfg.data.test_batch_size)
        self.log.info(
            f"Test set: Avg. loss: {result['test_loss']:.4f}, Accuracy: {result['correct']}/{result['count']} "
            f"({100.0 * result['test_accuracy']:.2f}%)"
        )
        digits = self._figure_digits() if self.ctx.is_leader else None
        self.metrics.test(self.global_step, epoch, epoch * len(self.train_split), result, digits)
        return result

    def _figure_digits(self) -> torch.Tensor:
        images = self.test_split.images[:FIGURE_DIGITS]
        with torch.no_grad():
            predictions = self.model(images.to(self.ctx.device)).argmax(dim=1).cpu()
        labels = self.test_split.labels[:FIGURE_DIGITS].cpu()  # on the GPU with speed.data_on_device
        return digit_grid(data.denormalize(images.cpu()), labels, predictions)

    def save_checkpoint(self) -> float:
        """Every rank hands rank 0 its RNG streams; rank 0 writes. Returns the seconds it took
        (kept out of the training throughput)."""
        start = time.perf_counter()
        rng = gather_to_leader(self.ctx, rng_state(self.ctx.device))
        state = {**self.state_dict(), "rng": rng} if self.ctx.is_leader else {}
        write = functools.partial(self.checkpoints.save, state, self.global_step, self.cfg.checkpoint.keep)
        on_some_ranks(self.ctx, self.ctx.is_leader, "writing a checkpoint", write)
        return time.perf_counter() - start

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs but the RNG streams (which live on every rank)."""
        recipe = resume_recipe(self.cfg)
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model_state(),
            "optimizer": self.optimizer.state_dict(),
            "epochs_done": self.epochs_done,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "samples_trained": self.samples_trained,
            "train_seconds": self.train_seconds,
            "resumes": self.resumes,
            "world_size": self.ctx.world_size,
            "train_samples": len(self.train_split),
            "recipe": recipe,
            "recipe_digest": recipe_digest(recipe),
        }

    def model_state(self) -> dict[str, torch.Tensor]:
        """The weights in the default memory layout whatever speed.channels_last trained with, so
        model.pt means the same to every reader (safetensors refuses strided tensors)."""
        return {key: value.contiguous() for key, value in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any], name: str) -> None:
        """Continue from a checkpoint (checked by resume.check_resumable on rank 0)."""
        if state["train_samples"] != len(self.train_split):
            raise ConfigError(
                f"cannot resume from {name}: it trained on {state['train_samples']} samples but the data now has "
                f"{len(self.train_split)}; point data.root at the data it was trained on, or start a new run"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epochs_done, self.batches_done = state["epochs_done"], state["batches_done"]
        self.global_step, self.samples_trained = state["global_step"], state["samples_trained"]
        self.train_seconds, self.resumes = state["train_seconds"], state.get("resumes", 0) + 1
        self.resumed_from = (name, state["world_size"])
        if state["world_size"] == self.ctx.world_size:
            restore_rng_state(state["rng"][self.ctx.rank], self.ctx.device)
        else:
            reseed_rank_streams_after_resize(self.cfg.seed, self.ctx.rank, self.global_step)
            if self.ctx.is_leader:
                self.log.warning(
                    f"resuming a {state['world_size']}-rank checkpoint on {self.ctx.world_size} ranks: the rest of "
                    "the epoch covers exactly the samples not yet seen, but the dropout streams are new, so the "
                    "weights will not equal an uninterrupted run's bit for bit"
                )
        self.log.info(
            f"Resuming from {name}: epoch {self.epochs_done + 1}, batch {self.batches_done}/{self.num_batches}, "
            f"step {self.global_step}"
        )

    def summary(self, result: dict[str, Any]) -> dict[str, Any]:
        return {
            **result,
            "world_size": self.ctx.world_size,
            "epochs": self.epochs_done,
            "global_step": self.global_step,
            "samples_trained": self.samples_trained,
            "train_seconds": self.train_seconds,
            "train_samples_per_second": self.samples_trained / self.train_seconds,
            "resumes": self.resumes,
            "backend": self.ctx.backend,
            "device": self.ctx.device.type,
            "launcher": self.ctx.env.launcher,
            "torch": torch.__version__,
        }


def run_training(cfg: Config) -> dict[str, Any]:
    """`python -m job train`: the whole job on this rank; returns the summary."""
    env = read_launch_env()
    rank_batch_size(cfg.data.global_batch_size, env.world_size)  # before any side effect
    if cfg.speed.compile and not any(
        shutil.which(cxx) for cxx in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if cxx
    ):
        raise ConfigError(
            "speed.compile=true needs a C++ compiler to build its kernels and none is on PATH; install g++ "
            "(apt-get install g++) or set speed.compile=false"
        )
    configure_determinism(cfg.deterministic)
    with distributed(cfg.dist, env) as ctx:
        log = setup_logging(ctx.rank, ctx.world_size)
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        log.info(
            f"Training on {ctx.world_size} rank(s), backend {ctx.backend}, device {ctx.device.type}, "
            f"{torch.get_num_threads()} thread(s) per rank, run directory {cfg.run_dir}"
            + (f", restart {restarts}" if restarts != "0" else "")
        )
        try:
            summary = _train(cfg, ctx, log)
        except RuntimeError as e:
            lost = peer_lost_error(e, cfg.dist.timeout_s)
            if lost is None:
                raise
            raise lost from None
        log.info(f"Done: test accuracy {summary['test_accuracy']:.4f}, results in {cfg.run_dir}")
        return summary


def _train(cfg: Config, ctx: DistContext, log: logging.Logger) -> dict[str, Any]:
    # Decided before the data step (which may download for minutes) and written after it, so
    # bad input never leaves a half-made or damaged run directory behind.
    found: list[ResumeSource | None] = []
    on_some_ranks(ctx, ctx.is_leader, "choosing where to start", lambda: found.append(find_resume_source(cfg, log)))
    source = found[0] if found else None
    raw = broadcast_bytes(ctx, source.data if source else None)
    name = str(source.path) if source else "the checkpoint rank 0 chose"
    state = loads_weights_only(raw, name) if raw else None
    splits = prepare_data(cfg, ctx, log, splits=("train", "test"))
    trainer = Trainer(cfg, ctx, splits)
    if state is not None:
        trainer.load_state_dict(state, name)
    on_some_ranks(ctx, ctx.is_leader, "preparing the run directory", lambda: prepare_run_dir(cfg, state is not None))
    return trainer.fit()


def run_evaluation(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """`python -m job evaluate`: exact test figures of a saved model, at any world size."""
    env = read_launch_env()
    model = load_model(checkpoint, dropout=cfg.model.dropout)
    configure_determinism(cfg.deterministic)
    with distributed(cfg.dist, env) as ctx:
        log = setup_logging(ctx.rank, ctx.world_size)
        splits = prepare_data(cfg, ctx, log, splits=("test",))
        return evaluate(model.to(ctx.device), splits["test"], ctx, cfg.data.test_batch_size)
