"""Where a run starts: from scratch, or from the newest valid checkpoint (train.resume).

Rank 0 decides, before anything is written: it reads the run directory, picks the
checkpoint, checks that it can be resumed under the current config, and hands its
bytes to the other ranks (train.py). Every refusal is one line naming the fix, and
nothing in the run directory is changed or deleted by looking.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.checkpoint import check_fields, recipe, recipe_digest
from job.config import Config, show
from job.errors import BadInputError, ConfigError, NewerFileError
from job.files import not_a_regular_file, read_regular
from job.model import state_shapes
from job.run_dir import RunDir
from job.safe_load import loads_weights_only, read_weights_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeSource:
    """The checkpoint a run resumes from: its path (for messages) and its raw bytes; for a run
    that has trained every epoch and written its results, `results` holds summary.json's bytes."""

    path: Path
    data: bytes
    results: bytes | None = None


def find_resume_source(cfg: Config) -> ResumeSource | None:
    """Rank 0: the checkpoint this run continues from, or None for a fresh start."""
    run, mode = RunDir(cfg.run_dir), cfg.train.resume
    if run.path.exists() and not run.path.is_dir():
        raise BadInputError(f"run.dir {run.path} is a file, not a directory; choose another run.dir")
    if mode == "never":
        _check_empty(run)
        return None
    own = run.checkpoints.files()
    if own:
        if mode != "auto":
            log.info(f"{run.path} already holds checkpoints of its own: resuming from those, not from {mode}")
        source = _newest_valid(own)
    else:
        _check_no_results(run)
        if mode == "auto":
            return None
        source = _read_given(Path(mode))
    state = loads_weights_only(source.data, source.path)
    check_resumable(state, source.path, cfg)
    if own and state["epochs_done"] >= cfg.train.epochs and not state["batches_done"]:
        return dataclasses.replace(source, results=_finished_results(run))
    return source


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


def _read_given(path: Path) -> ResumeSource:
    why = not_a_regular_file(path)
    if why:
        raise BadInputError(f"train.resume={path} {why}; pass a checkpoint file, or auto / never")
    return ResumeSource(path, read_weights_file(path))


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


def _newest_valid(files: list[Path]) -> ResumeSource:
    """The newest checkpoint that loads weights-only and holds a whole training state; damaged
    ones are reported and skipped, never deleted. One written by a newer torch or job version
    stops the search (NewerFileError): it is not damaged, and resuming from an older checkpoint
    would overwrite it with less progress."""
    for path in reversed(files):
        try:
            data = read_weights_file(path)
            check_fields(loads_weights_only(data, path), path, state_shapes())
        except NewerFileError as e:
            if path == files[0]:
                raise
            raise NewerFileError(
                f"{e}; the run stopped rather than resume from an older checkpoint and later write over this one"
            ) from None
        except BadInputError as e:
            log.warning(f"skipping checkpoint {path.name}: {e}; trying the one before it")
            continue
        return ResumeSource(path, data)
    raise BadInputError(
        f"none of the {len(files)} checkpoint(s) in {files[0].parent} can be loaded (see the warnings above); "
        "nothing was deleted: move them away to start over, or set train.resume=<checkpoint file>"
    )


def check_resumable(state: Any, path: Path, cfg: Config) -> None:
    """The checkpoint continues this config: same recipe, and not past train.epochs."""
    check_fields(state, path, state_shapes())
    current = recipe(cfg)
    if recipe_digest(current) != state["recipe_digest"]:
        old = state["recipe"]
        changed = [f"{k} {show(old.get(k))} -> {show(v)}" for k, v in current.items() if old.get(k) != v]
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
