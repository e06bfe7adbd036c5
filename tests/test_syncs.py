"""No host-device synchronisation inside the training loop (issue 25): the job's own training steps,
at 1 and 2 ranks, counted by a dispatch mode (tests/probes/sync_count.py)."""

from __future__ import annotations

import json

import pytest
from helpers import assert_ok, run_probe, tiny_overrides

LOOP = ("train.log_interval=3", "checkpoint.every_steps=5")
"""Log intervals and mid-epoch checkpoints inside the counted steps (the generated set has 8 steps an epoch)."""


def count_syncs(tiny_root, tmp_path, nproc: int, *extra: str) -> list[dict]:
    out = tmp_path / "syncs.json"
    args = [str(out), *tiny_overrides(tiny_root, tmp_path / "run", *LOOP), *extra]
    assert_ok(run_probe("sync_count.py", args, nproc=nproc))
    paths = [out, *(out.with_name(f"{out.name}.rank{rank}") for rank in range(1, nproc))]
    return [json.loads(path.read_text()) for path in paths]


@pytest.mark.processes
@pytest.mark.parametrize("nproc", [1, 2])
def test_training_steps_never_wait_for_the_device(tiny_root, tmp_path, nproc):
    """Every step, log intervals and stop votes included, runs without a .item() or a blocking
    copy to the host: only checkpoint writes and the epoch's end may wait (their own cadence)."""
    for rank, report in enumerate(count_syncs(tiny_root, tmp_path, nproc)):
        assert report["steps"] == 2 * 8, report  # both epochs counted
        in_steps = {f"{kind} {index}": n for kind, index, n in report["syncs"] if kind == "step"}
        assert not in_steps, f"rank {rank}: syncs inside training steps {in_steps}: {report['ops']}"


@pytest.mark.processes
def test_the_count_sees_an_item_added_inside_the_step(tiny_root, tmp_path):
    """The count can fail: one .item() of the loss per step shows up at every step."""
    (report,) = count_syncs(tiny_root, tmp_path, 1, "--add-item")
    in_steps = [n for kind, _, n in report["syncs"] if kind == "step"]
    assert len(in_steps) == report["steps"] == 2 * 8 and min(in_steps) >= 1, report["syncs"]
