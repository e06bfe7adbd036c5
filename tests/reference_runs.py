"""The finished runs many tests only read, trained once per pytest session on the generated data
(conftest.py's `one_process_run`, `two_rank_run`, `two_rank_checkpointed_run` fixtures), instead of
once per module that reads them.

A shared run is read, never written: a test that resumes, damages, extends or plots a run copies it
to its own tmp_path first (`shutil.copytree`). The fixtures check after each test that every
file of the run is as training left it, so a test that writes into one fails itself, not a later
test that reads it (the result of no test depends on the order they run in).

Logging and checkpoint cadence change which files a run writes, not its bits: the two 2-rank runs
end with the same weights (test_distributed.py::test_two_runs_give_bit_identical_weights compares
them). A test that asserts on cadence-specific files (which checkpoints exist, which lines were
logged) uses the run whose cadence it names, or trains its own.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from helpers import assert_ok, run_job, snapshot, tiny_overrides

ONE_PROCESS = (None, ("train.log_interval=2", "checkpoint.every_steps=3"))
"""`python -m job train`, no launcher: the loss logged every 2 steps (a training curve to plot),
a checkpoint every 3 steps (the newest 3 kept: steps 12, 15 and 16)."""
TWO_RANKS = (2, ("train.log_interval=2",))
"""torchrun with 2 ranks, checkpoints at the defaults (every 100 steps, more than an epoch's 8:
at each epoch end only, steps 8 and 16), the loss logged every 2 steps: the run directory
contract as a user gets it."""
TWO_RANKS_CHECKPOINTED = (2, ("checkpoint.every_steps=3", "checkpoint.keep=100"))
"""torchrun with 2 ranks keeping every checkpoint, every 3 steps and at both epoch ends (steps 3, 6,
8, 9, 12, 15, 16): the uninterrupted run the resume tests start from and compare with."""


@dataclass(frozen=True)
class FinishedRun:
    """A run trained to the end on the generated data (2 epochs, 16 steps of 64 samples)."""

    dir: Path
    """The run directory: read it, never write into it."""
    nproc: int | None
    """None: a plain `python -m job` process; else torchrun with that many ranks."""
    overrides: tuple[str, ...]
    """Its overrides after `tiny_overrides(root, dir)`."""
    result: subprocess.CompletedProcess[str] = field(repr=False)
    """The training command's exit code, stdout (rank 0's log lines) and stderr."""
    files: dict[str, str] = field(repr=False)
    """Every file as training left it, with its sha256 (helpers.snapshot)."""

    @property
    def pristine(self) -> Path:
        """A copy of the run directory as training left it, beside it (put back after a test wrote)."""
        return self.dir.with_name("pristine")

    def assert_untouched(self, test: str) -> None:
        """Fail `test` if it changed the run, after putting the run back as training left it (from
        its pristine copy), so that the tests after it read the run they expect."""
        now = snapshot(self.dir)
        if now == self.files:
            return
        changed = sorted(name for name in now.keys() | self.files.keys() if now.get(name) != self.files.get(name))
        shutil.rmtree(self.dir)
        shutil.copytree(self.pristine, self.dir)
        raise AssertionError(
            f"{test} changed the shared run {self.dir} ({', '.join(changed)}): copy it to the test's "
            "tmp_path (shutil.copytree) and resume, damage, extend or plot the copy"
        )


def train(root: Path, base: Path, nproc: int | None, overrides: tuple[str, ...]) -> FinishedRun:
    """Train `base`/run to the end (exit 0 asserted); `base`/pristine is a copy of it."""
    run_dir = base / "run"
    result = run_job(["train", *tiny_overrides(root, run_dir, *overrides)], nproc=nproc)
    assert_ok(result)
    shutil.copytree(run_dir, base / "pristine")
    return FinishedRun(run_dir, nproc, overrides, result, snapshot(run_dir))
