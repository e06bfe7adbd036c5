"""`make chaos`'s script itself, small: one whole-job kill and one worker kill on generated data."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, clean_env, make_tiny_mnist, tiny_overrides

pytestmark = [pytest.mark.processes, pytest.mark.slow]


def test_chaos_kills_a_job_and_a_worker_and_finds_the_same_bits(tmp_path):
    root = make_tiny_mnist(tmp_path / "data", train=100 * 64)
    overrides = tiny_overrides(root, tmp_path / "unused", "checkpoint.every_steps=10")
    overrides = [o for o in overrides if not o.startswith("run.dir=")]  # chaos.py places both runs itself
    # Schedule seed 9 draws a whole-job kill, then a worker kill.
    cmd = [sys.executable, "tests/tools/chaos.py", "--kills", "2", "--seed", "9", "--work", str(tmp_path / "chaos")]
    cmd += overrides
    result = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    kills = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("kill ")]
    assert kills == ["job", "worker"], result.stdout
    assert "bit-identical: all 8 tensors of model.pt equal the uninterrupted run's after 2 kills" in result.stdout
    assert "resumed from steps: [" in result.stdout
