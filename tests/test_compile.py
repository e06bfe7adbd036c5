"""speed.compile pays only if the timed loop runs the graph it compiled: one compile, before the
loop's throughput is counted, and no recompile at an epoch's partial last batch (issue 25 item 5).
Slow: inductor's C++ build takes tens of seconds here (tests/README.md, the slow tier)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import assert_ok, clean_env, run_job, tiny_overrides

from job.run_dir import RunDir

pytestmark = [pytest.mark.processes, pytest.mark.slow]


def test_compile_builds_the_step_once_and_keeps_its_time_out_of_the_throughput(tiny_root: Path, tmp_path: Path):
    # 512 samples in global batches of 96: 5 full steps and a partial one of 32 per epoch (16 per rank).
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_root, run_dir, "speed.compile=true", "data.global_batch_size=96")
    result = run_job(["train", *args], nproc=2, timeout=900, env=clean_env(TORCH_LOGS="recompiles"))
    assert_ok(result)
    recompiles = [line for line in result.stderr.splitlines() if "Recompiling" in line]
    assert not recompiles, "a recompile inside the training loop:\n" + "\n".join(recompiles)
    compiled = re.findall(r"speed\.compile: the training step compiled in ([0-9.]+) s", result.stdout)
    assert len(compiled) == 1, result.stdout  # once per job, by rank 0
    assert json.loads(RunDir(run_dir).summary.read_text())["test_accuracy"] > 0.8
