"""`make gpu-check` (tests/tools/gpu_check.py) in the mode CI runs: --allow-cpu, on a host without CUDA.

The CUDA steps themselves run on a GPU host (`make gpu-check` there); here the script runs end
to end so it cannot rot: every step that can run on the CPU passes, the CUDA-only ones are
reported skipped (never passed), broken input fails the check, and the deadline skips steps.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, clean_env

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs its CUDA steps: make gpu-check"),
]

CUDA_ONLY = {"tf32-off", "speed.tf32", "shared-gpu", "bench"}


def gpu_check(out: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], dict]:
    cmd = [sys.executable, "tests/tools/gpu_check.py", "--allow-cpu", "--out", str(out), *args]
    result = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    report = json.loads((out / "gpu-check.json").read_text())
    return result, report


def statuses(report: dict) -> dict[str, str]:
    return {step["name"]: step["status"] for step in report["steps"]}


@pytest.mark.slow
def test_cpu_mode_passes_every_cpu_step_and_skips_the_cuda_ones(tmp_path: Path) -> None:
    result, report = gpu_check(tmp_path, "--synthetic")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert report["ok"] and report["mode"] == "cpu" and report["counts"]["failed"] == 0
    steps = {step["name"]: step for step in report["steps"]}
    for name in CUDA_ONLY:
        assert steps[name]["cuda_only"] and (steps[name]["status"], steps[name]["detail"]) == ("skipped", "no CUDA")
    assert steps["speed.compile"]["status"] == "skipped", "minutes on this CPU: tests/test_speed.py runs it"
    passed = set(steps) - CUDA_ONLY - {"speed.compile"}
    assert {name for name in passed if steps[name]["status"] != "passed"} == set(), report
    # Every job the check ran says where it ran; the smoke pair was bit-identical and W=1.
    for name in ("smoke", "resume", "sigterm", "speed.bf16", "speed.channels_last", "speed.data_on_device"):
        assert steps[name]["ran_on"] == "cpu/gloo", steps[name]
        assert all(run["exit"] in (0, 75) for run in steps[name]["runs"]), steps[name]["runs"]
    assert "two runs bit-identical" in steps["smoke"]["detail"]
    assert "every weight identical" in steps["no-nan-fills"]["detail"], steps["no-nan-fills"]
    assert [run["exit"] for run in steps["sigterm"]["runs"]] == [75, 0]
    assert "bits equal to the default run" in steps["speed.data_on_device"]["detail"]
    assert steps["accelerate"]["runs"][0]["launcher"] == "accelerate"
    assert {"torch", "Python", "driver", "cc", "c++", "Python.h", "/dev/shm", "torch.compile lacks"} <= set(
        report["environment"]
    )
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert markdown.startswith("# GPU check\n\n**PASSED**")
    assert "| tf32-off * | skipped |" in markdown and "| smoke | passed |" in markdown
    assert all((tmp_path / run["log"]).is_file() for step in report["steps"] for run in step["runs"])


def test_damaged_data_fails_the_check_and_says_why(tmp_path: Path) -> None:
    """--data with .gz files that are not MNIST: the data step fails, the steps that train are
    skipped for it, the rest still runs, and the exit status is 1."""
    data = tmp_path / "data"
    data.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (data / f"{name}.gz").write_bytes(gzip.compress(b"not MNIST"))
    result, report = gpu_check(tmp_path / "out", "--data", str(data), timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    steps = {step["name"]: step for step in report["steps"]}
    assert steps["data"]["status"] == "failed"
    assert "not the MNIST release: checksum mismatch" in steps["data"]["detail"], steps["data"]
    assert (steps["smoke"]["status"], steps["smoke"]["detail"]) == ("skipped", "needs data (failed)")
    assert steps["resume"]["detail"] == "needs smoke (skipped)"
    assert statuses(report)["environment"] == statuses(report)["net"] == "passed"
    assert not report["ok"] and "**FAILED**" in (tmp_path / "out/gpu-check.md").read_text()


def test_the_deadline_skips_the_steps_it_leaves_no_time_for(tmp_path: Path) -> None:
    result, report = gpu_check(tmp_path, "--synthetic", "--deadline", "0", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert statuses(report)["environment"] == statuses(report)["data"] == "passed"
    # The steps that could start are skipped for the deadline; those that build on them for that.
    assert report["skipped_by_deadline"] == ["net", "no-nan-fills", "smoke", "accelerate"]
    steps = {step["name"]: step for step in report["steps"]}
    assert steps["net"]["detail"].startswith("deadline: ") and steps["resume"]["detail"] == "needs smoke (skipped)"
    assert set(statuses(report).values()) == {"passed", "skipped"}
    assert "**PASSED, INCOMPLETE" in (tmp_path / "gpu-check.md").read_text()
