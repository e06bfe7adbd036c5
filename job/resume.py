"""Where a run starts: from scratch, or from the newest valid checkpoint (train.resume).

Rank 0 decides, before anything is written: it reads the run directory, picks the
checkpoint, checks that it can be resumed under the current config, and hands its
bytes to the other ranks (train.py). Every refusal is one line naming the fix, and
nothing in the run directory is changed or deleted by looking.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from job.checkpoint import CheckpointDir, loads_weights_only
from job.config import Config, resume_recipe
from job.errors import ConfigError, JobError

CHECKPOINT_FORMAT = 1
# Files only a finished (or once-finished) run leaves: their presence without checkpoints
# means results that a fresh start would silently overwrite.
RESULT_FILES = ("model.pt", "summary.json")


@dataclass(frozen=True)
class ResumeSource:
    """The checkpoint a run resumes from: its path (for messages) and its raw bytes."""

    path: Path
    data: bytes


def recipe_digest(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def checkpoint_dir(cfg: Config) -> CheckpointDir:
    return CheckpointDir(cfg.run_dir / "checkpoints")


def find_resume_source(cfg: Config, log: logging.Logger) -> ResumeSource | None:
    """Rank 0: the checkpoint this run continues from, or None for a fresh start."""
    run_dir, mode = cfg.run_dir, cfg.train.resume
    if run_dir.exists() and not run_dir.is_dir():
        raise JobError(f"run.dir {run_dir} is a file, not a directory; choose another run.dir")
    if mode == "never":
        _check_empty(run_dir)
        return None
    own = checkpoint_dir(cfg).files()
    if own:
        if mode != "auto":
            log.info(f"{run_dir} already holds checkpoints of its own: resuming from those, not from {mode}")
        source = _newest_valid(own, log)
    else:
        _check_no_results(run_dir)
        if mode == "auto":
            return None
        source = _read_given(Path(mode))
    check_resumable(loads_weights_only(source.data, source.path), source.path, cfg)
    return source


def _read_given(path: Path) -> ResumeSource:
    if not path.is_file():
        raise JobError(f"train.resume={path} does not exist; pass a checkpoint file, or auto / never")
    try:
        return ResumeSource(path, path.read_bytes())
    except OSError as e:
        raise JobError(f"train.resume={path} cannot be read ({e.strerror})") from None


def _check_empty(run_dir: Path) -> None:
    if run_dir.is_dir() and any(run_dir.iterdir()):
        held = ", ".join(sorted(p.name for p in run_dir.iterdir())[:4])
        raise JobError(
            f"run directory {run_dir} is not empty (holds {held}) and train.resume=never; pass run.name=<new name> "
            "or run.dir=<new dir>, set train.resume=auto to continue it, or delete it to start over"
        )


def _check_no_results(run_dir: Path) -> None:
    """No checkpoint to resume from: a fresh start may replace the leftovers of a run that died
    before its first checkpoint, but never a finished run's results."""
    results = [name for name in RESULT_FILES if (run_dir / name).exists()]
    if results:
        raise JobError(
            f"run directory {run_dir} holds results ({', '.join(results)}) but no checkpoint to resume from; "
            "pass run.name=<new name> or run.dir=<new dir>, or delete it to start over"
        )


def _newest_valid(files: list[Path], log: logging.Logger) -> ResumeSource:
    """The newest checkpoint that loads weights-only and holds a whole training state; damaged
    ones are reported and skipped, never deleted."""
    for path in reversed(files):
        try:
            data = path.read_bytes()
            check_fields(loads_weights_only(data, path), path)
        except (JobError, OSError) as e:
            log.warning(f"skipping checkpoint {path.name}: {e}; trying the one before it")
            continue
        return ResumeSource(path, data)
    raise JobError(
        f"none of the {len(files)} checkpoint(s) in {files[0].parent} can be loaded (see the warnings above); "
        "nothing was deleted: move them away to start over, or set train.resume=<checkpoint file>"
    )


_FIELDS = {
    "format": int,
    "model": dict,
    "optimizer": dict,
    "epochs_done": int,
    "batches_done": int,
    "global_step": int,
    "samples_trained": int,
    "train_seconds": float,
    "world_size": int,
    "train_samples": int,
    "recipe": dict,
    "recipe_digest": str,
    "rng": list,
}


def check_fields(state: Any, path: Path) -> None:
    """A whole training state of the format this code writes (not a model.pt, not another tool's file)."""
    if not isinstance(state, dict):
        raise JobError(f"checkpoint {path} is not a training checkpoint (it holds a {type(state).__name__})")
    missing = [key for key, kind in _FIELDS.items() if not isinstance(state.get(key), kind)]
    if missing:
        raise JobError(
            f"checkpoint {path} is not a training checkpoint of this job (missing or wrong: {', '.join(missing)}); "
            "a model.pt holds weights only and cannot be resumed"
        )
    if state["format"] != CHECKPOINT_FORMAT:
        raise JobError(f"checkpoint {path} has format {state['format']}; this job reads format {CHECKPOINT_FORMAT}")
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise JobError(f"checkpoint {path} holds a damaged model state_dict")
    if len(state["rng"]) != state["world_size"]:
        raise JobError(f"checkpoint {path} holds {len(state['rng'])} RNG states for {state['world_size']} ranks")


def check_resumable(state: Any, path: Path, cfg: Config) -> None:
    """The checkpoint continues this config: same recipe, and not past train.epochs."""
    check_fields(state, path)
    recipe = resume_recipe(cfg)
    if recipe_digest(recipe) != state["recipe_digest"]:
        old = state["recipe"]
        changed = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in recipe.items() if old.get(key) != value]
        raise ConfigError(
            f"cannot resume from {path}: the config changed in a way a resume cannot follow "
            f"({', '.join(changed) or 'recipe digest differs'}); restore the old value(s), or start a new run "
            "with run.name=<new name>"
        )
    done = state["epochs_done"] + (1 if state["batches_done"] else 0)
    if done > cfg.train.epochs:
        raise ConfigError(
            f"cannot resume from {path}: it has trained into epoch {done} but train.epochs={cfg.train.epochs}; "
            f"set train.epochs >= {done}, or start a new run with run.name=<new name>"
        )
