"""The position in training: the one list of fields that checkpoints, resume and the summary share."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any


@dataclass
class Progress:
    """Where training stands. A checkpoint stores these fields flat, under these names."""

    epochs_done: int = 0
    """Whole epochs trained."""
    batches_done: int = 0
    """Global batches trained in the next epoch (non-zero only for a mid-epoch checkpoint)."""
    global_step: int = 0
    """Optimizer steps taken since the run began, over all epochs and resumes."""
    samples_trained: int = 0
    """Training samples seen, summed over ranks."""
    train_seconds: float = 0.0
    """Seconds spent in the training loop (start-up, evaluation and checkpoint writes excluded)."""
    resumes: int = 0
    """How many times the run was resumed from a checkpoint."""

    def advance(self, batch_index: int, global_batch_samples: int) -> None:
        """One optimizer step done: the `batch_index`-th batch of the epoch (0-based)."""
        self.global_step += 1
        self.batches_done = batch_index + 1
        self.samples_trained += global_batch_samples

    def finish_epoch(self) -> None:
        self.epochs_done += 1
        self.batches_done = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Progress:
        """The position a checkpoint recorded (checked by checkpoint.check_fields)."""
        return cls(**{name: state[name] for name in FIELDS})


FIELDS: dict[str, type] = typing.get_type_hints(Progress)
"""Each field's name and type, for the checks a checkpoint must pass."""
