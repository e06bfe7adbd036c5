"""The run directory's contract: every file a run writes there, named once (README: "The run directory").

Training (rank 0 only) writes config.yaml, metrics.jsonl, tb/, checkpoints/, then model.pt
and summary.json at the end; `python -m job plot` writes plots/. The job, the tools and the
tests all find these files through RunDir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from job.checkpoint import CheckpointDir


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        """The resolved config that ran (YAML)."""
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        """One JSON object per event (train, train_epoch, test, resume)."""
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoints(self) -> CheckpointDir:
        return CheckpointDir(self.path / "checkpoints")

    @property
    def model(self) -> Path:
        """The final weights: a plain state_dict, loadable with weights_only=True."""
        return self.path / "model.pt"

    @property
    def summary(self) -> Path:
        """The final figures (JSON)."""
        return self.path / "summary.json"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def results(self) -> list[Path]:
        """The files only a finished (or once-finished) run leaves: with no checkpoint beside
        them, they are results a fresh start would silently overwrite."""
        return [path for path in (self.model, self.summary) if path.exists()]
