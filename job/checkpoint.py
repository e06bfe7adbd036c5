"""The training checkpoint's one owner: where a run starts, what a checkpoint holds and whether it
can be resumed, reading it (once per process), writing it, and what a resume changes.

`Checkpoints` does all of it, on every rank, as torchtitan's CheckpointManager
(torchtitan/components/checkpoint.py) does for its trainer: the Trainer only exposes its plain
state (state_dict/load_state_dict) and knows nothing of the file. The walk of a resume:

    Checkpoints.choose_start    rank 0, before the data step: the newest valid checkpoint of the
                                run directory, or train.resume's file, read once (job/untrusted.py),
                                unpickled once, checked (check_fields, then the recipe and
                                train.epochs); the state is kept
    Checkpoints.load_start      rank 0 sends the file's bytes; the other ranks unpickle them once;
                                rank 0 hands on the state it kept
    Checkpoints.resume          the data it trained on, Trainer.load_state_dict, every rank's RNG
                                streams, and what else changed (world size, bit_environment)
    Checkpoints.save            every rank's RNG streams gathered, Trainer.state_dict on rank 0,
                                written atomically (job/safe_io.py), the newest checkpoint.keep kept

A checkpoint is one flat dict, written with torch.save and read with
`torch.load(weights_only=True)` (tensors and plain containers only):

    format            CHECKPOINT_FORMAT
    model             the net's state_dict, default memory layout
    optimizer         SGD's state_dict (momentum buffers included)
    epochs_done ...   the Progress fields (job/progress.py), flat
    world_size        ranks that trained it
    train_samples     size of the training split it trained on
    recipe            RECIPE_KEYS -> values;  recipe_digest: sha256 of its JSON
    rng               every rank's generator states, in rank order (job/seeding.py)
    environment       what the bits depend on besides the config (seeding.bit_environment);
                      absent from checkpoints written before it was recorded

Files are `checkpoints/step-<global step, 9 digits>.pt`, the highest step the newest (job/run_dir.py:
CheckpointDir names, lists, writes and prunes them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from job.collectives import broadcast_bytes, gather_to_leader, on_some_ranks
from job.config import Config, get_dotted, show
from job.errors import BadInputError, ConfigError, NewerFileError
from job.files import not_a_regular_file, read_regular
from job.model import state_shapes
from job.process_group import DistContext
from job.progress import FIELDS as PROGRESS_FIELDS
from job.progress import Progress
from job.run_dir import RunDir
from job.seeding import bit_environment, reseed_rank_streams_after_resize, restore_rng_state, rng_state
from job.untrusted import loads_weights_only, read_weights_file

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1

RECIPE_KEYS = ("seed", "data.global_batch_size", "data.train_limit", "model.dropout", "optim.lr", "optim.momentum")
"""Config keys a checkpoint's position (epoch, batches done) and RNG streams depend on: a run
resumes from a checkpoint only under the same values."""

_FIELDS: dict[str, type] = {
    "format": int,
    "model": dict,
    "optimizer": dict,
    **PROGRESS_FIELDS,
    "world_size": int,
    "train_samples": int,
    "recipe": dict,
    "recipe_digest": str,
    "rng": list,
}


ADDED_RECIPE_KEYS = ("optim.nesterov", "optim.weight_decay", "optim.schedule")
"""Recipe keys added after checkpoints were first written: recorded only when set away from their
default, so a checkpoint written before them (at their defaults) keeps its recipe digest and resumes."""

SCHEDULE_KEYS = ("optim.warmup", "train.epochs")
"""What a step's learning rate depends on besides optim.lr under a schedule (job/schedule.py: the
run's length and its warm-up): recorded when optim.schedule is not constant, so a resume cannot
change the rate of the steps still to come."""

RECORDABLE_KEYS = RECIPE_KEYS + ADDED_RECIPE_KEYS + SCHEDULE_KEYS


def recipe(cfg: Config) -> dict[str, Any]:
    """The values of RECIPE_KEYS in `cfg`, and of ADDED_RECIPE_KEYS and SCHEDULE_KEYS where they
    count, as a checkpoint records them."""
    defaults = Config()
    values = {key: get_dotted(cfg, key) for key in RECIPE_KEYS}
    values |= {key: value for key in ADDED_RECIPE_KEYS if (value := get_dotted(cfg, key)) != get_dotted(defaults, key)}
    if cfg.optim.schedule != "constant":
        values |= {key: get_dotted(cfg, key) for key in SCHEDULE_KEYS}
    return values


def recipe_digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def training_state(
    trainer: dict[str, Any],
    world_size: int,
    train_samples: int,
    cfg: Config,
    rng: list[Any],
    environment: dict[str, Any],
) -> dict[str, Any]:
    """A checkpoint's contents (see the module docstring) from the trainer's plain state (model,
    optimizer, progress: Trainer.state_dict), every tensor on the CPU: a checkpoint written on a
    GPU then loads anywhere, without map_location."""
    values = recipe(cfg)
    return {
        "format": CHECKPOINT_FORMAT,
        "model": to_cpu(trainer["model"]),
        "optimizer": to_cpu(trainer["optimizer"]),
        **trainer["progress"],
        "world_size": world_size,
        "train_samples": train_samples,
        "recipe": values,
        "recipe_digest": recipe_digest(values),
        "rng": to_cpu(rng),
        "environment": environment,
    }


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it (nested dicts, lists, tuples) on the CPU; CPU tensors stay as they
    are. The device tensors come over in one copy per dtype (one wait for the device, not one per
    tensor: the net's weights and momentum buffers are 16), each into its own storage with its
    shape and strides, as its own `.cpu()` would give it."""
    on_device: list[torch.Tensor] = []
    _collect_device_tensors(obj, on_device)
    copies = {id(tensor): copy for tensor, copy in zip(on_device, copy_to_host(on_device), strict=True)}
    return _replace_tensors(obj, copies)


def copy_to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Host copies of `tensors` (any devices), one transfer per device and dtype: the elements of each
    in memory order, concatenated on the device, copied at once, then split into tensors of their
    own storage with the original shapes and strides (for dense layouts: contiguous, channels_last)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    copies: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for members in groups.values():
        orders = [sorted(range(tensors[i].dim()), key=lambda d, t=tensors[i]: -t.stride(d)) for i in members]
        flat = torch.cat(
            [tensors[i].detach().permute(order).reshape(-1) for i, order in zip(members, orders, strict=True)]
        ).cpu()
        parts = flat.split([tensors[i].numel() for i in members])
        for i, order, part in zip(members, orders, parts, strict=True):
            shape = [tensors[i].shape[d] for d in order]
            copies[i] = part.view(shape).permute(sorted(range(len(order)), key=order.__getitem__)).clone()
    return copies


def _collect_device_tensors(obj: Any, found: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            found.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _collect_device_tensors(value, found)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _collect_device_tensors(value, found)


def _replace_tensors(obj: Any, copies: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return copies.get(id(obj), obj.detach())
    if isinstance(obj, dict):
        return {key: _replace_tensors(value, copies) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_tensors(value, copies) for value in obj)
    return obj


def check_fields(state: Any, path: Path, model_shapes: dict[str, tuple[int, ...]]) -> None:
    """A whole training state of the format this code writes, for the net whose parameter and
    buffer shapes are `model_shapes`: every field a resume reads is there, of its type, and fits
    (weights and momentum buffers of those shapes, one RNG state per rank, a position that is
    not negative). BadInputError naming the first thing that does not, otherwise."""
    if not isinstance(state, dict):
        raise BadInputError(f"checkpoint {path} is not a training checkpoint (it holds a {type(state).__name__})")
    missing = [key for key, kind in _FIELDS.items() if not isinstance(state.get(key), kind)]
    if missing:
        raise BadInputError(
            f"checkpoint {path} is not a training checkpoint of this job (missing or wrong: {', '.join(missing)}); "
            "a model.pt holds weights only and cannot be resumed"
        )
    if state["format"] > CHECKPOINT_FORMAT:
        raise NewerFileError(
            f"checkpoint {path} has format {state['format']}, written by a newer version of this job; this code reads "
            f"format {CHECKPOINT_FORMAT}: the file is intact and was left as it is: run the newer job code"
        )
    if state["format"] != CHECKPOINT_FORMAT:
        raise BadInputError(
            f"checkpoint {path} has format {state['format']}; this job reads format {CHECKPOINT_FORMAT}"
        )
    wrong = _misfit(state, model_shapes)
    if wrong:
        raise BadInputError(f"checkpoint {path} does not fit this job's net and training state: {wrong}")


def _misfit(state: dict[str, Any], model_shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What in a checkpoint with the right fields cannot be loaded into this net, its optimizer,
    its ranks' generators and its position; None when everything fits."""
    model = state["model"]
    if set(model) != set(model_shapes):
        return f"its model has keys {sorted(set(model) ^ set(model_shapes))[:3]} that the net's do not match"
    for key, shape in model_shapes.items():
        if not isinstance(model[key], torch.Tensor) or tuple(model[key].shape) != shape:
            return f"model {key} has shape {tuple(getattr(model[key], 'shape', ()))}, the net's is {shape}"
    shapes = list(model_shapes.values())  # parameters first, in the net's order: what SGD indexes
    groups, buffers = state["optimizer"].get("param_groups"), state["optimizer"].get("state")
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(buffers, dict):
        return "its optimizer state is not one SGD parameter group"
    for index, entry in buffers.items():
        momentum = entry.get("momentum_buffer") if isinstance(entry, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(shapes):
            return f"its optimizer state names parameter {index}, which the net does not have"
        if momentum is not None and (not isinstance(momentum, torch.Tensor) or tuple(momentum.shape) != shapes[index]):
            return f"the momentum of parameter {index} does not have the parameter's shape {shapes[index]}"
    if len(state["rng"]) != state["world_size"]:
        return f"it holds {len(state['rng'])} RNG states for {state['world_size']} ranks"
    for rank, streams in enumerate(state["rng"]):
        if not (isinstance(streams, dict) and isinstance(streams.get("cpu"), torch.Tensor) and "python" in streams):
            return f"rank {rank}'s RNG state lacks the CPU or python generator"
    negative = [name for name in PROGRESS_FIELDS if state[name] < 0]
    if negative or state["world_size"] < 1 or state["train_samples"] < 1:
        return f"its position is impossible ({', '.join(negative) or 'world_size or train_samples'} below range)"
    return None


class Resumable(Protocol):
    """What Checkpoints.resume needs of a trainer (job/train.py's Trainer): where it stands, its
    epoch's length in steps, the training data (its size) and a way to take back its plain state."""

    progress: Progress
    num_batches: int
    train_split: Sized

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Loaded:
    """A checkpoint to resume from, on one rank: `name` for messages (rank 0: the file's path; the
    other ranks never see the file) and its contents, checked on rank 0 (check_fields, the recipe,
    train.epochs)."""

    name: str
    state: dict[str, Any]


@dataclass(frozen=True)
class _Chosen:
    """Rank 0's choice: the checkpoint's path, its bytes (what the other ranks receive) and its
    contents; for a run that has trained every epoch and written its results, `results` holds
    summary.json's bytes."""

    path: Path
    data: bytes
    state: dict[str, Any]
    results: bytes | None = None


class Checkpoints:
    """A run's checkpoints, on every rank: where the run starts (choose_start, finished_summary,
    load_start), continuing a Trainer from one (resume) and writing them (save).

    Rank 0 alone reads and writes the files; each file it considers is read once and unpickled
    once, and the other ranks receive the chosen one's bytes (so ranks on hosts without the shared
    volume resume too) and unpickle them once, weights only. Every refusal is one line naming the
    fix, decided before anything is written, and nothing in the run directory is changed or
    deleted by looking.
    """

    def __init__(self, cfg: Config, ctx: DistContext, run: RunDir) -> None:
        self.cfg, self.ctx, self.run = cfg, ctx, run
        self.environment = bit_environment(ctx.device, ctx.world_size)
        self.resumed_from: tuple[str, int] | None = None
        """(the checkpoint, its world size) once resume() has run."""
        self._chosen: _Chosen | None = None  # rank 0's, from choose_start until load_start

    # --- where the run starts -------------------------------------------------------------------

    def choose_start(self) -> None:
        """Rank 0 picks the checkpoint this run continues from (or a fresh start), reads and checks
        it; the other ranks wait for the verdict. A JobError on rank 0 stops every rank."""
        self._chosen = on_some_ranks(self.ctx, self.ctx.is_leader, "choosing where to start", self._choose)

    def finished_summary(self) -> dict[str, Any] | None:
        """On every rank: summary.json of a run started again after it finished (nothing to train,
        nothing to write), else None."""
        finished = broadcast_bytes(self.ctx, self._chosen.results if self._chosen else None)
        return json.loads(finished) if finished else None

    def load_start(self) -> Loaded | None:
        """On every rank: the checkpoint chosen, None for a fresh start. Rank 0 sends the file's
        bytes and hands on the state it has read and checked; the other ranks unpickle what they
        receive (weights only)."""
        chosen, self._chosen = self._chosen, None
        raw = broadcast_bytes(self.ctx, chosen.data if chosen else None)
        if chosen is not None:
            return Loaded(str(chosen.path), chosen.state)
        name = "the checkpoint rank 0 chose"
        return Loaded(name, loads_weights_only(raw, name)) if raw else None

    def _choose(self) -> _Chosen | None:
        """Rank 0: the checkpoint this run continues from, or None for a fresh start."""
        run, mode = self.run, self.cfg.train.resume
        if mode == "never":
            _check_empty(run)
            return None
        own = run.checkpoints.files()
        if own:
            if mode != "auto":
                log.info(f"{run.path} already holds checkpoints of its own: resuming from those, not from {mode}")
            chosen = _newest_valid(own)
        else:
            _check_no_results(run)
            if mode == "auto":
                return None
            chosen = _read_given(Path(mode))
        self._check_continues(chosen.state, chosen.path)
        if own and chosen.state["epochs_done"] >= self.cfg.train.epochs and not chosen.state["batches_done"]:
            return dataclasses.replace(chosen, results=_finished_results(run))
        return chosen

    def _check_continues(self, state: dict[str, Any], path: Path) -> None:
        """A checkpoint whose fields fit (check_fields) continues this config: same recipe, and
        not past train.epochs. ConfigError otherwise."""
        current = recipe(self.cfg)
        if recipe_digest(current) != state["recipe_digest"]:
            old = state["recipe"]
            keys = [*current, *(key for key in RECORDABLE_KEYS if key in old and key not in current)]  # absent: default
            defaults = Config()
            was = {key: old.get(key, get_dotted(defaults, key)) for key in keys}
            now = {key: get_dotted(self.cfg, key) for key in keys}
            changed = [f"{k} {show(was[k])} -> {show(now[k])}" for k in keys if was[k] != now[k]]
            raise ConfigError(
                f"cannot resume from {path}: the config changed in a way a resume cannot follow "
                f"({', '.join(changed) or 'recipe digest differs'}); restore the old value(s), or start a new run "
                "with run.name=<new name>"
            )
        done, epochs = state["epochs_done"] + (1 if state["batches_done"] else 0), self.cfg.train.epochs
        if done > epochs:
            raise ConfigError(
                f"cannot resume from {path}: it has trained into epoch {done} but train.epochs={epochs}; "
                f"set train.epochs >= {done}, or start a new run with run.name=<new name>"
            )

    # --- resuming -------------------------------------------------------------------------------

    def resume(self, trainer: Resumable, loaded: Loaded) -> None:
        """Continue `trainer` from `loaded`, on every rank: the data must be what it trained on
        (ConfigError otherwise); each rank takes back its own RNG streams, or new ones at another
        world size; rank 0 warns of what else the bits depend on that changed."""
        state, name = loaded.state, loaded.name
        if state["train_samples"] != len(trainer.train_split):
            raise ConfigError(
                f"cannot resume from {name}: it trained on {state['train_samples']} samples but the data now has "
                f"{len(trainer.train_split)}; point data.root at the data it was trained on, or start a new run"
            )
        progress = {field: state[field] for field in PROGRESS_FIELDS}
        trainer.load_state_dict({"model": state["model"], "optimizer": state["optimizer"], "progress": progress})
        trainer.progress.resumes += 1
        self.resumed_from = (name, state["world_size"])
        self._take_back_rng_streams(state["rng"], state["world_size"], trainer.progress.global_step)
        self._warn_of_environment_changes(state.get("environment", {}))
        done = trainer.progress
        if done.epochs_done < self.cfg.train.epochs:  # else Trainer.fit() says the run is complete
            log.info(
                f"Resuming from {name}: epoch {done.epochs_done + 1}, batch {done.batches_done}/"
                f"{trainer.num_batches}, step {done.global_step}"
            )

    def _take_back_rng_streams(self, rng: list[Any], world_size: int, global_step: int) -> None:
        """This rank's generator states from a checkpoint of `world_size` ranks; at another world
        size, where old streams cannot map one-to-one onto the new ranks, new ones (rank 0 warns)."""
        ctx = self.ctx
        if world_size == ctx.world_size:
            restore_rng_state(rng[ctx.rank], ctx.device)
            return
        reseed_rank_streams_after_resize(self.cfg.seed, ctx.rank, global_step)
        if ctx.is_leader:
            log.warning(
                f"resuming a {world_size}-rank checkpoint on {ctx.world_size} ranks: the rest of "
                "the epoch covers exactly the samples not yet seen, but the dropout streams are new, so the "
                "weights will not equal an uninterrupted run's bit for bit"
            )

    def _warn_of_environment_changes(self, then: dict[str, Any]) -> None:
        """Rank 0: one warning naming what the bits depend on (besides the world size, warned of
        apart) that differs from when the checkpoint was written."""
        changed = {
            key: (old, self.environment.get(key))
            for key, old in then.items()
            if key != "world_size" and old != self.environment.get(key)
        }
        if changed and self.ctx.is_leader:
            log.warning(
                f"resuming a checkpoint written with {', '.join(f'{k}={old}' for k, (old, _) in changed.items())} "
                f"under {', '.join(f'{k}={new}' for k, (_, new) in changed.items())}: the run continues, but its "
                "weights will not equal an uninterrupted run's bit for bit"
            )

    # --- saving ---------------------------------------------------------------------------------

    def save(
        self, step: int, trainer_state: Callable[[], dict[str, Any]], train_samples: int, then: Callable[[], None]
    ) -> None:
        """The checkpoint of `step`, on every rank: each hands rank 0 its RNG streams; rank 0 writes
        `trainer_state()` (Trainer.state_dict) with them atomically, keeps the newest
        checkpoint.keep, then calls `then()`. A failure there (RunFailedError for a refused write)
        stops every rank."""

        def write() -> None:
            state = training_state(trainer_state(), self.ctx.world_size, train_samples, self.cfg, rng, self.environment)
            self.run.checkpoints.save(state, step, self.cfg.checkpoint.keep)
            then()

        # The gather belongs to the checkpoint too: a collective timeout in it names the checkpoint,
        # not the step or the test before it (job/hang.py). A gather's senders finish it without
        # the receiver, so a rank stopped there left rank 0 in the gather and the others in
        # on_some_ranks: both must name the same place.
        phase = "writing a checkpoint"
        with self.ctx.at.during(phase):
            rng = gather_to_leader(self.ctx, rng_state(self.ctx.device))
            on_some_ranks(self.ctx, self.ctx.is_leader, phase, write)


def _finished_results(run: RunDir) -> bytes | None:
    """summary.json's bytes when a run that trained every epoch also wrote its results (else None:
    the job evaluates the final checkpoint again and writes them)."""
    if not_a_regular_file(run.model) or not_a_regular_file(run.summary):
        return None
    try:
        data = read_regular(run.summary, "", "")
        return data if "test_accuracy" in json.loads(data) else None
    except (BadInputError, ValueError, TypeError):  # unreadable or not ours: written again
        return None


def _read(path: Path) -> _Chosen:
    """A checkpoint file read (once) and unpickled (once, weights only), its fields checked."""
    data = read_weights_file(path)
    state = loads_weights_only(data, path)
    check_fields(state, path, state_shapes())
    return _Chosen(path, data, state)


def _read_given(path: Path) -> _Chosen:
    why = not_a_regular_file(path)
    if why:
        raise BadInputError(f"train.resume={path} {why}; pass a checkpoint file, or auto / never")
    return _read(path)


def _check_empty(run: RunDir) -> None:
    held = sorted(p.name for p in run.contents())
    if held:
        raise BadInputError(
            f"run directory {run.path} is not empty (holds {', '.join(held[:4])}) and train.resume=never; pass "
            "run.name=<new name> or run.dir=<new dir>, set train.resume=auto to continue it, or delete it to start over"
        )


def _check_no_results(run: RunDir) -> None:
    """No checkpoint to resume from: a fresh start may replace the leftovers of a run that died
    before its first checkpoint, but never a finished run's results."""
    results = run.results()
    if results:
        raise BadInputError(
            f"run directory {run.path} holds results ({', '.join(p.name for p in results)}) but no checkpoint to "
            "resume from; pass run.name=<new name> or run.dir=<new dir>, or delete it to start over"
        )


def _newest_valid(files: list[Path]) -> _Chosen:
    """The newest checkpoint that loads weights-only and holds a whole training state; damaged
    ones are reported and skipped, never deleted. One written by a newer torch or job version
    stops the search (NewerFileError): it is not damaged, and resuming from an older checkpoint
    would overwrite it with less progress."""
    for path in reversed(files):
        try:
            return _read(path)
        except NewerFileError as e:
            if path == files[0]:
                raise
            raise NewerFileError(
                f"{e}; the run stopped rather than resume from an older checkpoint and later write over this one"
            ) from None
        except BadInputError as e:
            log.warning(f"skipping checkpoint {path.name}: {e}; trying the one before it")
            continue
    raise BadInputError(
        f"none of the {len(files)} checkpoint(s) in {files[0].parent} can be loaded (see the warnings above); "
        "nothing was deleted: move them away to start over, or set train.resume=<checkpoint file>"
    )
