"""The loop: data and run directory prepared once, DDP training, exact distributed evaluation.

Read top to bottom: run_training (the job on one rank, start to end), then the Trainer (the
tutorial's recipe: build the net, then for each epoch train over the shuffled training set and
test on the full test set), then the helpers they call. Checkpoints, and where a run starts,
are job/checkpoint.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from job import data
from job.checkpoint import Checkpoints, to_cpu
from job.collectives import all_reduce_sum, mean_in_rank_order, on_some_ranks, read_host
from job.config import Config, dump_config, rank_batch_size
from job.console import ProgressBar, setup_logging
from job.cpu_kernels import cpu_capability, pin_missed
from job.cpu_quota import threads_per_process
from job.device import compile_toolchain_missing, quiet_compiler
from job.errors import BadInputError, ConfigError, PreemptedError, RunFailedError, message_line
from job.files import write_fix
from job.hang import flight_recorder_env, hang_report, make_flight_recorder_dir
from job.launch_env import read_launch_env
from job.metrics import Metrics, NullMetrics, digit_grid
from job.model import Net, load_model
from job.peer_lost import peer_lost_error
from job.preemption import STOP_VOTE_EVERY_STEPS, StopRequest, StopVote
from job.process_exit import keep_until_exit
from job.process_group import DistContext, distributed
from job.progress import Progress
from job.provenance import source_commit
from job.run_dir import RunDir, RunDirLock
from job.safe_io import atomic_save, atomic_write_json, atomic_write_text
from job.same_run import check_same_run, run_identity
from job.schedule import learning_rate
from job.seeding import bit_environment, configure_numerics, seed_parameter_init, seed_rank_streams
from job.tracking import Tracking

log = logging.getLogger(__name__)

_DIVERGED = (
    "training diverged, most often from a learning rate too high for the batch; start a new run "
    "(run.name=<new name>) with a lower optim.lr"
)

FIGURE_DIGITS = 6
"""Test digits drawn with label and prediction, as in the tutorial's figure."""


def run_training(cfg: Config) -> dict[str, Any]:
    """`python -m job train`: the whole job on this rank; returns the summary."""
    env = read_launch_env()
    rank_batch_size(cfg.data.global_batch_size, env.world_size)  # before any side effect
    configure_numerics(cfg.deterministic, cfg.speed.tf32)
    flight_recorder_env(cfg.run_dir)  # read by an NCCL process group when it starts
    with distributed(cfg.dist, env) as ctx:
        start_rank(cfg, ctx)
        with lost_peers_in_one_line(cfg, ctx), run_dir_locked(ctx, RunDir(cfg.run_dir), cfg.run.lock_wait_s):
            # Where to start is decided before the data step (which may download for minutes) and the
            # run directory written after it, so bad input never leaves a half-made or damaged one behind.
            checkpoints = Checkpoints(cfg, ctx, RunDir(cfg.run_dir))
            checkpoints.choose_start()
            tracking = connect_tracking(cfg, ctx)
            summary = checkpoints.finished_summary()
            if summary is not None:  # a run started again after it finished: nothing to train, nothing to write
                report_finished_run(cfg, ctx, summary, tracking)
            else:
                start = checkpoints.load_start()
                trainer = Trainer(cfg, ctx, prepare_data(cfg, ctx, splits=("train", "test")), checkpoints)
                trainer.tracking = tracking
                if start is not None:
                    checkpoints.resume(trainer, start)
                prepare_run_dir(cfg, ctx, trainer.environment)
                summary = trainer.fit()
        log.info(f"Done: test accuracy {summary['test_accuracy']:.4f}, results in {cfg.run_dir}")
        return summary


class Trainer:
    """The model, its optimizer and the position in training, for one rank."""

    def __init__(self, cfg: Config, ctx: DistContext, splits: dict[str, data.Split], checkpoints: Checkpoints) -> None:
        self.cfg, self.ctx, self.run, self.checkpoints = cfg, ctx, RunDir(cfg.run_dir), checkpoints
        self.train_split, self.test_split = splits["train"], splits["test"]
        self.rank_batch = rank_batch_size(cfg.data.global_batch_size, ctx.world_size)
        self.sampler = data.train_sampler(len(self.train_split), ctx.rank, ctx.world_size, cfg.seed)
        self.num_batches = data.num_train_batches(self.sampler, self.rank_batch)
        repeated = -len(self.train_split) % ctx.world_size
        if repeated and ctx.is_leader:
            log.warning(
                f"{len(self.train_split)} training samples do not split evenly over {ctx.world_size} ranks: "
                f"{repeated} sample(s) repeat each epoch (DistributedSampler pads the shards), so this run is "
                "not step-for-step equal to a 1-rank run; pick data.train_limit divisible by the world size"
            )

        # The order matters: every rank builds the same initial weights from `seed` (so DDP's
        # broadcast changes nothing and W=1 starts from the tutorial's weights), and only then
        # switches its global generator to its own stream, which dropout draws from.
        seed_parameter_init(cfg.seed)
        self.model, self.step_model = build_train_model(cfg, ctx)
        self.compiled_loss = compile_loss(self.loss_of) if cfg.speed.compile else None
        self.compile_seconds: float | None = None  # the first compiled step's host time, once measured
        seed_rank_streams(cfg.seed, ctx.rank)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
            weight_decay=cfg.optim.weight_decay,
        )
        self.total_steps = cfg.train.epochs * self.num_batches  # the length optim.schedule spans

        self.progress = Progress()
        # The loss of the latest log interval, on its way to the host while the next steps run: it
        # is read one interval later (or at a checkpoint, or at the epoch's end), never at once,
        # so the loop does not wait for the device (docs/PERFORMANCE.md).
        self.loss_host = torch.zeros((), pin_memory=ctx.device.type == "cuda")
        self.logged: LoggedLoss | None = None
        self.environment = bit_environment(ctx.device, ctx.world_size)
        self.metrics: NullMetrics = NullMetrics()
        self.tracking: Tracking | None = None  # rank 0's MLflow run (tracking.mlflow)

    def fit(self) -> dict[str, Any]:
        on_some_ranks(self.ctx, self.ctx.is_leader, "opening the metrics", self.open_metrics)
        try:
            result = None
            with StopRequest() as stop:
                while self.progress.epochs_done < self.cfg.train.epochs:
                    epoch = self.progress.epochs_done + 1
                    self.train_epoch(epoch, stop)
                    self.progress.finish_epoch()
                    result = self.test(epoch)
                    self.save_checkpoint()
            if result is None:  # resumed a run that had finished its epochs: figures for the summary
                log.info(f"All {self.progress.epochs_done} epochs were trained already: writing the final results")
                self.ctx.at.enter("testing the trained weights")
                result = evaluate(self.model, self.test_split, self.ctx, self.cfg.data.test_batch_size)
            summary = self.summary(result)
            on_some_ranks(self.ctx, self.ctx.is_leader, "writing the results", lambda: self.write_results(summary))
            return summary
        finally:
            self.metrics.close()

    def open_metrics(self) -> None:
        """Rank 0: metrics.jsonl and TensorBoard, picking up where the checkpoint left them."""
        self.metrics = Metrics(self.run, start_step=self.progress.global_step)
        if self.checkpoints.resumed_from:
            name, world_size = self.checkpoints.resumed_from
            self.metrics.resume(
                self.progress.global_step, self.progress.epochs_done + 1, name, self.ctx.world_size, world_size
            )
        if self.tracking:
            self.tracking.begin(self.environment, self.ctx.env.launcher)

    def write_results(self, summary: dict[str, Any]) -> None:
        """Rank 0: model.pt and summary.json. RunFailedError when the weights are not finite or the
        disk refuses; the checkpoints stay as they are either way."""
        self.metrics.check()
        weights = self.finite_model_state()
        for path, write in ((self.run.model, lambda: atomic_save(weights, self.run.model)),
                            (self.run.summary, lambda: atomic_write_json(self.run.summary, summary))):  # fmt: skip
            try:
                write()
            except OSError as e:
                raise RunFailedError(
                    f"cannot write {path} ({e.strerror or message_line(e)}); the checkpoints are intact: "
                    f"{write_fix(e)} and run the same command again, which writes the results again"
                ) from None
        if self.tracking:
            self.tracking.finish()

    def finite_model_state(self) -> dict[str, torch.Tensor]:
        """model_state(), or RunFailedError when a weight is NaN or infinite (finite_weights)."""
        return self.finite_weights(self.model_state())

    def finite_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`weights` (host copies), or RunFailedError when one is NaN or infinite: such weights are
        never saved, so the newest checkpoint stays the last good one."""
        broken = [key for key, value in weights.items() if not torch.isfinite(value).all()]
        if broken:
            raise RunFailedError(
                f"the weights became NaN or infinite by step {self.progress.global_step} ({', '.join(broken[:3])}): "
                f"{_DIVERGED}; nothing was written over the newest checkpoint"
            )
        return weights

    def train_epoch(self, epoch: int, stop: StopRequest) -> None:
        """The rest of epoch `epoch` (all of it, unless a resume landed inside it)."""
        self.sampler.set_epoch(epoch - 1)  # a new shuffle every epoch, the same on every rank
        skip = self.progress.batches_done
        bar = ProgressBar(self.num_batches - skip, f"Epoch {epoch}", enabled=self.ctx.is_leader)
        self.step_model.train()
        samples_before, checkpoint_seconds, start = self.progress.samples_trained, 0.0, time.perf_counter()
        compiles_now = self.compiled_loss is not None and self.compile_seconds is None
        batches = data.train_batches(self.train_split, self.sampler, self.rank_batch, skip=skip)
        for batch_idx, (images, labels) in enumerate(batches, start=skip):
            self.ctx.at.start_step(self.progress.global_step + 1)  # what a collective timeout names (job/hang.py)
            vote = self.start_stop_vote(stop, batch_idx)  # overlaps the step's work
            loss = self.step(images, labels)
            # Every rank's batch is the same size, so the mean of rank means is the global batch mean.
            self.progress.advance(batch_idx, len(labels) * self.ctx.world_size)
            bar.update()
            if batch_idx % self.cfg.train.log_interval == 0:
                self.log_step(epoch, batch_idx, loss, bar)
            checkpoint_seconds += self.checkpoint_or_stop(epoch, stop, vote, bar)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        self.print_logged_loss(bar)  # the epoch's last interval, before its summary and test lines
        seconds = time.perf_counter() - start - checkpoint_seconds
        if compiles_now and self.compile_seconds is not None:
            seconds -= self.compile_seconds  # reported once, apart (compiled_step_loss)
        bar.clear()
        self.progress.train_seconds += seconds
        samples_per_second = (self.progress.samples_trained - samples_before) / seconds
        log.info(f"Epoch {epoch}: {bar.total} steps in {seconds:.1f} s, {samples_per_second:,.0f} samples/s")
        self.metrics.train_epoch(self.progress.global_step, epoch, samples_per_second)

    def start_stop_vote(self, stop: StopRequest, batch_idx: int) -> StopVote | None:
        """Ask every rank whether it was told to stop, every STOP_VOTE_EVERY_STEPS steps and at
        the epoch's last step; all ranks vote after the same steps, so they stop after the same one."""
        step = self.progress.global_step + 1
        if step % STOP_VOTE_EVERY_STEPS == 0 or batch_idx + 1 == self.num_batches:
            return StopVote(self.ctx, stop)
        return None

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's share of a global batch; returns its loss."""
        images = images.to(self.ctx.device, non_blocking=True)
        labels = labels.to(self.ctx.device, non_blocking=True)
        if self.cfg.speed.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.compiled_step_loss(images, labels) if self.compiled_loss else self.loss_of(images, labels)
        loss.backward()
        for group in self.optimizer.param_groups:  # from the position alone: a resume takes the same rates
            group["lr"] = self.learning_rate(self.progress.global_step)
        self.optimizer.step()
        return loss

    def learning_rate(self, step: int) -> float:
        """The learning rate of the step taken after `step` steps (job/schedule.py)."""
        return learning_rate(self.cfg.optim, step, self.total_steps)

    def loss_of(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The forward pass and the loss: what speed.compile compiles (the backward follows the graph)."""
        with self.autocast():
            output = self.step_model(images)
        return F.nll_loss(output.float(), labels)  # CPU autocast leaves log_softmax in bf16

    def compiled_step_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """loss_of through the graph compiled for the full rank batch; an epoch's partial last batch
        runs eagerly instead of recompiling inside the timed loop. The first call compiles: its
        host time is logged once and kept out of the epoch's samples/s (compile_seconds)."""
        if len(labels) != self.rank_batch:
            return self.loss_of(images, labels)
        if self.compile_seconds is not None:
            return self.compiled_loss(images, labels)
        start = time.perf_counter()
        loss = self.compiled_loss(images, labels)  # compiling is host work: no device sync is needed to time it
        self.compile_seconds = time.perf_counter() - start
        if self.ctx.is_leader:
            log.info(f"speed.compile: the training step compiled in {self.compile_seconds:.1f} s (out of samples/s)")
        return loss

    def log_step(self, epoch: int, batch_idx: int, loss: torch.Tensor, bar: ProgressBar) -> None:
        """At a log interval: print the previous interval's line, then start this one's loss (the
        mean over ranks) on its way to the host without waiting for it (print_logged_loss reads it)."""
        self.print_logged_loss(bar)
        total = loss.detach()
        if self.ctx.world_size > 1:  # a lone rank's loss is already the mean: no collective
            total = all_reduce_sum(total.clone())
        self.loss_host.copy_(total, non_blocking=True)  # pinned on CUDA: an asynchronous copy
        copied = None
        if self.ctx.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        self.logged = LoggedLoss(epoch, batch_idx, self.progress.global_step, copied)

    def print_logged_loss(self, bar: ProgressBar) -> None:
        """The tutorial's line for the pending log interval, with the loss averaged over ranks, and the
        same figure in the metrics; RunFailedError when that loss is not finite (so the stop on a
        diverged run comes at most one log interval late, and before any checkpoint is written)."""
        logged, self.logged = self.logged, None
        if logged is None:
            return
        if logged.copied is not None:
            logged.copied.synchronize()  # long done by now: the steps since were queued behind it
        cfg, epoch, batch_idx = self.cfg, logged.epoch, logged.batch_idx
        mean_loss = read_host(self.loss_host) / self.ctx.world_size
        if not math.isfinite(mean_loss):  # the same mean on every rank: all stop here together
            raise RunFailedError(
                f"the training loss became {mean_loss} at step {logged.step} (epoch {epoch}): "
                f"{_DIVERGED}; the newest checkpoint holds the last good weights"
            )
        dataset_size = len(self.train_split)
        done = min(batch_idx * cfg.data.global_batch_size, dataset_size)
        bar.clear()
        log.info(
            f"Train Epoch: {epoch} [{done}/{dataset_size} ({100.0 * batch_idx / self.num_batches:.0f}%)]"
            f"  Loss: {mean_loss:.6f}"
        )
        examples_seen = (epoch - 1) * dataset_size + done
        self.metrics.train_step(logged.step, epoch, examples_seen, mean_loss, self.learning_rate(logged.step - 1))

    def checkpoint_or_stop(self, epoch: int, stop: StopRequest, vote: StopVote | None, bar: ProgressBar) -> float:
        """After a step: write a checkpoint when one is due or the ranks agreed to stop, then stop
        (PreemptedError) if they did. Returns the seconds spent writing (kept out of the throughput).
        Epoch-end checkpoints are written by fit(), after the test."""
        stopping = vote is not None and vote.any_rank_stopping()
        every, progress = self.cfg.checkpoint.every_steps, self.progress
        due = every and progress.global_step % every == 0 and progress.batches_done < self.num_batches
        if stopping or due:  # the pending log line first: a resume from this checkpoint never logs it
            self.print_logged_loss(bar)
        seconds = self.save_checkpoint() if stopping or due else 0.0
        if stopping:
            bar.clear()
            why = {"SIGINT": "Ctrl-C (SIGINT)", None: "another rank's stop request"}.get(
                stop.signal_name, stop.signal_name
            )
            log.warning(f"{why}: stopping after step {progress.global_step}, checkpoint written")
            raise PreemptedError(
                f"by {why} after step {progress.global_step} (epoch {epoch}, batch {progress.batches_done}/"
                f"{self.num_batches}), checkpoint {self.run.checkpoints.path_for(progress.global_step)} written; "
                "run the same command again to resume"
            )
        return seconds

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast of the forward pass when speed.bf16 is on: convolutions and matmuls in bf16."""
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.cfg.speed.bf16)

    def test(self, epoch: int) -> dict[str, Any]:
        self.ctx.at.enter(f"testing epoch {epoch}")
        result = evaluate(self.model, self.test_split, self.ctx, self.cfg.data.test_batch_size)
        log.info(
            f"Test set: Avg. loss: {result['test_loss']:.4f}, Accuracy: {result['correct']}/{result['count']} "
            f"({100.0 * result['test_accuracy']:.2f}%)"
        )
        digits = self._figure_digits() if self.ctx.is_leader else None
        self.metrics.test(self.progress.global_step, epoch, epoch * len(self.train_split), result, digits)
        return result

    def _figure_digits(self) -> torch.Tensor:
        images = self.test_split.images[:FIGURE_DIGITS]
        with torch.no_grad():
            predictions = self.model(images.to(self.ctx.device)).argmax(dim=1).cpu()
        labels = self.test_split.labels[:FIGURE_DIGITS].cpu()  # on the GPU with speed.data_on_device
        return digit_grid(data.denormalize(images.cpu()), labels, predictions)

    def save_checkpoint(self) -> float:
        """Every rank hands its RNG streams to the checkpoint, rank 0 writes it (job/checkpoint.py).
        Returns the seconds it took (kept out of the training throughput)."""
        start, step = time.perf_counter(), self.progress.global_step

        def state() -> dict[str, Any]:  # rank 0
            self.metrics.check()
            return self.state_dict()

        def written() -> None:  # the points this checkpoint covers: a resume never logs them again
            if self.tracking:
                self.tracking.sync(step)

        self.checkpoints.save(step, state, len(self.train_split), then=written)
        return time.perf_counter() - start

    def state_dict(self) -> dict[str, Any]:
        """What this rank's training state is (plain containers; the checkpoint file's format is
        job/checkpoint.py's): the finite weights (RunFailedError otherwise), the optimizer's state
        and the position in training."""
        # Weights and momentum buffers come to the host together: one wait for the device, not 16.
        weights, optimizer = to_cpu((weights_in_place(self.model), self.optimizer.state_dict()))
        return {
            "model": self.finite_weights(weights),
            "optimizer": optimizer,
            "progress": self.progress.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back a state_dict() (checked by job/checkpoint.py's Checkpoints, which restores the RNG streams)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress.from_dict(state["progress"])

    def model_state(self) -> dict[str, torch.Tensor]:
        """The weights on the CPU in the default memory layout, whatever device and speed.channels_last
        trained them, so model.pt means the same to every reader: a plain torch.load on a host without
        GPUs, safetensors (which refuses strided tensors). One copy from the device (job/checkpoint.py's to_cpu)."""
        return to_cpu(weights_in_place(self.model))

    def summary(self, result: dict[str, Any]) -> dict[str, Any]:
        """summary.json: the final test figures, the position reached, and what ran it."""
        progress = self.progress
        return {
            **result,
            **progress.to_dict(),
            "epochs": progress.epochs_done,
            "train_samples_per_second": progress.samples_trained / progress.train_seconds,
            **self.environment,
            "backend": self.ctx.backend,
            "launcher": self.ctx.env.launcher,
            "commit": source_commit(),
            **({"threads_from": threads_decided_by(self.ctx)} if self.ctx.device.type == "cpu" else {}),
        }


def start_rank(cfg: Config, ctx: DistContext) -> None:
    """This rank's logging, then the checks every rank passes before any step or write (the same
    run on every rank, the compiler toolchain), then the opening line."""
    keep_process_groups(ctx)
    setup_logging(ctx.rank, ctx.world_size)
    check_same_run(ctx, run_identity(cfg, bit_environment(ctx.device, ctx.world_size)))  # before any step or write
    if cfg.speed.compile:  # every rank checks its own host; all stop if one lacks a tool
        on_some_ranks(ctx, True, "checking the compiler toolchain", lambda: check_compile_toolchain(ctx.device))
        quiet_compiler()
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    log.info(
        f"Training on {ctx.world_size} rank(s), backend {ctx.backend}, device {ctx.device.type}, "
        f"{torch.get_num_threads()} thread(s) per rank"
        + (f" ({threads_decided_by(ctx)})" if ctx.device.type == "cpu" else "")
        + f", run directory {cfg.run_dir}"
        + (f", restart {restarts}" if restarts != "0" else "")
    )
    if ctx.device.type == "cpu" and ctx.is_leader and pin_missed(cfg.speed.native_cpu_kernels):
        log.warning(
            f"the CPU kernels run {cpu_capability()}, not the portable AVX2 (torch was loaded before the job "
            "pinned them, or ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA/MKL_ENABLE_INSTRUCTIONS are set): the "
            "bits will differ from other hosts'; start the job as `python -m job train`"
        )


@contextlib.contextmanager
def run_dir_locked(ctx: DistContext, run: RunDir, wait_s: float) -> Iterator[None]:
    """Rank 0 holds the run directory's lock (job/run_dir.py) for the whole run, waiting up to
    `wait_s` seconds for a holder on another host; every rank stops if it cannot be taken."""
    lock = RunDirLock(run, wait_s)
    on_some_ranks(ctx, ctx.is_leader, "locking the run directory", lock.acquire)
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def lost_peers_in_one_line(cfg: Config, ctx: DistContext) -> Iterator[None]:
    """A collective that failed because of a peer ends in one line (PeerLostError, with a hang
    report after a timeout); any other RuntimeError is a bug and keeps its traceback."""
    try:
        yield
    except RuntimeError as e:
        where = (ctx.at, ctx.rank, ctx.world_size, cfg.dist.timeout_s, cfg.run_dir, ctx.backend, e)
        lost = peer_lost_error(e, cfg.dist.timeout_s, functools.partial(hang_report, *where))
        if lost is None:
            raise
        raise lost from None


def report_finished_run(cfg: Config, ctx: DistContext, summary: dict[str, Any], tracking: Tracking | None) -> None:
    """A run started again after it finished: say so, and send MLflow what an earlier end could not."""
    log.info(
        f"{cfg.run_dir} holds a finished run ({summary.get('epochs')} epochs, step {summary.get('global_step')}): "
        "nothing to do, nothing written; train more with a higher train.epochs, or start another run with "
        "run.name=<new name>"
    )
    if cfg.tracking.mlflow:  # what an earlier end could not send
        on_some_ranks(ctx, ctx.is_leader, "sending the results to MLflow", lambda: tracking.finish())


@dataclasses.dataclass(frozen=True)
class LoggedLoss:
    """A log interval whose loss is still being copied to Trainer.loss_host."""

    epoch: int
    batch_idx: int
    step: int
    """The global step whose loss it is (what the line and the metrics name)."""
    copied: torch.cuda.Event | None
    """Recorded after the copy on CUDA; None on the CPU, where the copy is done when it returns."""


def weights_in_place(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights on their device, in the default memory layout (Trainer.model_state copies them to the host)."""
    return {key: value.detach().contiguous() for key, value in model.state_dict().items()}


def prepare_data(cfg: Config, ctx: DistContext, splits: tuple[str, ...]) -> dict[str, data.Split]:
    """Fetch (once per host, the other local ranks wait) and load the requested splits on every rank."""
    fetch = functools.partial(data.ensure_mnist, cfg.data.root, cfg.data.download, cfg.data.verify)
    on_some_ranks(ctx, ctx.is_local_leader, "preparing MNIST", fetch)
    limits = {"train": cfg.data.train_limit, "test": None}
    loaded = {split: data.load_split(cfg.data.root, split, limits[split]) for split in splits}
    if cfg.speed.data_on_device:  # batches are then gathered on the device: no host-to-device copy per step
        loaded = {name: split.to(ctx.device) for name, split in loaded.items()}
    return loaded


def connect_tracking(cfg: Config, ctx: DistContext) -> Tracking | None:
    """Rank 0's MLflow run (tracking.mlflow), None elsewhere or when off. The server is asked
    before anything is written: unreachable is bad input (exit 2)."""
    connect = functools.partial(Tracking.connect, cfg)
    return on_some_ranks(ctx, ctx.is_leader and cfg.tracking.mlflow, "connecting to the MLflow server", connect)


def prepare_run_dir(cfg: Config, ctx: DistContext, environment: dict[str, Any]) -> None:
    """Once the start is decided and the data is ready, rank 0 writes the run directory (every
    rank stops if it cannot); with NCCL, every rank makes the flight recorder's directory."""
    on_some_ranks(ctx, ctx.is_leader, "preparing the run directory", lambda: write_run_dir(cfg, environment))
    if ctx.backend == "nccl" and make_flight_recorder_dir(cfg.run_dir) and ctx.is_leader:
        log.info(f"A collective timeout writes torch's NCCL flight recorder to {cfg.run_dir}/hang/nccl-trace-rank-N")


def write_run_dir(cfg: Config, environment: dict[str, Any]) -> None:
    """Rank 0, once the start is decided and the data is ready: the run directory with the
    resolved config.yaml (headed by what else the bits depend on, as a comment) and
    checkpoints/ (minus the temporary file of a writer that died)."""
    run = RunDir(cfg.run_dir)
    try:
        run.checkpoints.path.mkdir(parents=True, exist_ok=True)
        run.checkpoints.remove_partial_writes()
        ran_with = ", ".join(f"{key} {value}" for key, value in environment.items())
        header = f"# Ran with {ran_with}: with this config, what the weights' bits depend on.\n"
        atomic_write_text(run.config, header + dump_config(cfg))
    except OSError as e:
        raise BadInputError(
            f"cannot write run directory {run.path} ({e.strerror}); set run.dir to a writable path"
        ) from None


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
    """The tutorial's net on this rank's device, from the global generator's current state, and
    what the training step calls: its DDP wrapper (a single rank has nothing to average: the net
    itself, the same bits without DDP's per-step bookkeeping); speed.compile compiles the loss
    around it (compile_loss), not the module."""
    model = Net(dropout=cfg.model.dropout).to(ctx.device)
    if cfg.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model: torch.nn.Module = model
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        step_model = DistributedDataParallel(model, device_ids=device_ids)
        step_model.register_comm_hook(None, mean_in_rank_order)
    return model, step_model


def compile_loss(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    """torch.compile of the forward pass and loss (the DDP wrapper inside, so its buckets are
    respected), for one shape: dynamic=False, since the only other shape, an epoch's partial last
    batch, runs eagerly (Trainer.compiled_step_loss). With the default dynamic=None that batch
    recompiled inside the timed loop and every later batch ran the dynamic-shape graph (issue 25:
    4,025 samples/s on an H200, slower than eager)."""
    return torch.compile(loss_of, dynamic=False)


def threads_decided_by(ctx: DistContext) -> str:
    """What set this CPU rank's threads: OMP_NUM_THREADS, the cgroup CPU quota or the cores (job/cpu_quota.py)."""
    return threads_per_process(ctx.env.local_world_size)[1]


def keep_process_groups(ctx: DistContext) -> None:
    """The process groups outlive `dist.destroy_process_group()` until the process ends: their
    destructors can deadlock against gloo's threads (job/process_exit.py)."""
    keep_until_exit(torch.distributed.group.WORLD)
    keep_until_exit(ctx)  # and its control group


def check_compile_toolchain(device: torch.device) -> None:
    """speed.compile builds kernels at the first step: what it needs must be here before training starts."""
    missing = compile_toolchain_missing(device)
    if missing:
        raise ConfigError(
            f"speed.compile=true needs {', '.join(missing)} to build its {device.type} kernels, and this host "
            "lacks them; install them or set speed.compile=false"
        )


def run_evaluation(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """`python -m job evaluate`: exact test figures of a saved model, at any world size."""
    env = read_launch_env()
    model = load_model(checkpoint, dropout=cfg.model.dropout)
    configure_numerics(cfg.deterministic, cfg.speed.tf32)
    with distributed(cfg.dist, env) as ctx:
        keep_process_groups(ctx)
        setup_logging(ctx.rank, ctx.world_size)
        check_same_run(ctx, run_identity(cfg, bit_environment(ctx.device, ctx.world_size)))
        splits = prepare_data(cfg, ctx, splits=("test",))
        return evaluate(model.to(ctx.device), splits["test"], ctx, cfg.data.test_batch_size)
