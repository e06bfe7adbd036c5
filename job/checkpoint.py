"""The training checkpoint: its format (version, fields, recipe digest), its file names, and the
run's checkpoints/ directory.

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

Files are `checkpoints/step-<global step, 9 digits>.pt`; the highest step is the newest.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from job.config import Config, get_dotted
from job.errors import BadInputError, NewerFileError, RunFailedError, message_line
from job.files import write_fix
from job.progress import FIELDS as PROGRESS_FIELDS
from job.progress import Progress
from job.safe_io import atomic_save

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


def recipe(cfg: Config) -> dict[str, Any]:
    """The values of RECIPE_KEYS in `cfg`, as a checkpoint records them."""
    return {key: get_dotted(cfg, key) for key in RECIPE_KEYS}


def recipe_digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def training_state(
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    progress: Progress,
    world_size: int,
    train_samples: int,
    cfg: Config,
    rng: list[Any],
    environment: dict[str, Any],
) -> dict[str, Any]:
    """A checkpoint's contents (see the module docstring), every tensor on the CPU: a checkpoint
    written on a GPU then loads anywhere, without map_location."""
    values = recipe(cfg)
    return {
        "format": CHECKPOINT_FORMAT,
        "model": to_cpu(model),
        "optimizer": to_cpu(optimizer),
        **progress.to_dict(),
        "world_size": world_size,
        "train_samples": train_samples,
        "recipe": values,
        "recipe_digest": recipe_digest(values),
        "rng": to_cpu(rng),
        "environment": environment,
    }


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it (nested dicts, lists, tuples) copied to the CPU; CPU tensors stay as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
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


WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes a wrapper adds to a state dict it saves: DistributedDataParallel/DataParallel
(`module.`) and torch.compile (`_orig_mod.`). Weights saved through a wrapper are the same weights."""


def model_state_of(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state_dict from a loaded model.pt (a state_dict) or a training checkpoint, with
    wrapper prefixes (WRAPPER_PREFIXES) removed when every key carries one."""
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(f"checkpoint {path} holds no model state_dict; pass a model.pt or checkpoint file")
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(str(key).startswith(prefix) for key in state):
                state = {str(key)[len(prefix) :]: value for key, value in state.items()}
                stripped = True
    return state


class CheckpointDir:
    """A run's checkpoints/: `step-<global step>.pt` files, the highest step the newest.

    Only rank 0 writes here. A new checkpoint is complete on disk before the oldest
    beyond `keep` is deleted, so a crash at any moment leaves at least one whole one.
    """

    _NAME = re.compile(r"^step-(\d{9})\.pt$")

    def __init__(self, path: Path) -> None:
        self.path = path

    def path_for(self, step: int) -> Path:
        return self.path / f"step-{step:09d}.pt"

    @classmethod
    def step_of(cls, path: Path) -> int | None:
        """The global step a checkpoint file was written after; None for a file that is not one."""
        match = cls._NAME.match(Path(path).name)
        return int(match.group(1)) if match else None

    def files(self) -> list[Path]:
        """Checkpoint files, oldest first (other files are not ours and are left alone)."""
        if not self.path.is_dir():
            return []
        steps = [(step, p) for p in self.path.iterdir() if (step := self.step_of(p)) is not None]
        return [p for _, p in sorted(steps)]

    def save(self, state: dict[str, Any], step: int, keep: int) -> Path:
        """Write `state` as the checkpoint of `step`, then delete all but the newest `keep`.
        RunFailedError when the disk refuses the write (the previous checkpoints stay)."""
        path = self.path_for(step)
        try:
            atomic_save(state, path)
        except OSError as e:
            raise RunFailedError(
                f"cannot write checkpoint {path} ({e.strerror or message_line(e)}); the previous checkpoints are "
                f"intact: {write_fix(e)} (or lower checkpoint.keep) and start the job again to resume"
            ) from None
        for old in self.files()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def remove_partial_writes(self) -> None:
        """Temporary files of a writer that died mid-write (never a checkpoint anyone reads)."""
        if self.path.is_dir():
            for tmp in self.path.glob(".step-*.tmp"):
                tmp.unlink(missing_ok=True)
