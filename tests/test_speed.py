"""The opt-in speed switches (speed.*): each runs and trains on CPU; off, nothing changes.

The switches exist for accelerators, where CI has none: these tests pin that each code
path runs end to end (W=2 gloo, so DDP is in the path), that the net still learns, and
that model.pt stays a plain state_dict every reader (evaluate, export) takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_one_line_error, assert_same_weights, clean_env, run_job, tiny_overrides

from job import data
from job.model import Net
from job.run_dir import RunDir

SWITCHES = {
    "bf16": ["speed.bf16=true"],
    "channels_last": ["speed.channels_last=true"],
    "compile": ["speed.compile=true"],
    "data_on_device": ["speed.data_on_device=false"],  # on by default: the switch is the host path
}


def train(tiny_root: Path, run_dir: Path, *extra: str, nproc: int | None = 2) -> tuple[dict, str]:
    """The run's summary.json and its stderr."""
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, *extra)], nproc=nproc, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(RunDir(run_dir).summary.read_text()), result.stderr


@pytest.fixture
def baseline(two_rank_run) -> Path:
    """Every switch at its default at 2 ranks: the session's shared run (its cadence changes no bit)."""
    return two_rank_run.dir


# compile's run (inductor's C++ build, about 20 s here) is in the slow tier; test_device.py pins
# what compile needs per device, and the three other switches run here.
@pytest.mark.processes
@pytest.mark.parametrize("switch", [pytest.param(s, marks=pytest.mark.slow) if s == "compile" else s for s in SWITCHES])
def test_switch_runs_and_trains(switch: str, tiny_root: Path, tmp_path: Path, baseline: Path) -> None:
    summary, stderr = train(tiny_root, tmp_path / switch, *SWITCHES[switch])
    # Off, the generated digits are learned to 100% in two epochs; chance is 10%. The switches
    # change the arithmetic (bf16, kernel order) or the dropout stream (compile), so the figure
    # moves, but the net must still learn.
    assert summary["test_accuracy"] > 0.8, summary
    state = torch.load(RunDir(tmp_path / switch).model, weights_only=True)
    assert all(t.is_contiguous() for t in state.values()), "model.pt must hold default-layout tensors"
    Net().load_state_dict(state)
    if switch != "data_on_device":  # that one changes nothing on CPU (next test)
        off = torch.load(RunDir(baseline).model, weights_only=True)
        assert any(not torch.equal(state[k], off[k]) for k in off), f"speed.{switch}=true changed nothing"
    config = RunDir(tmp_path / switch).config.read_text()
    assert f"{SWITCHES[switch][0].split('.')[1].replace('=', ': ')}" in config
    torch_warnings = [line for line in stderr.splitlines() if line.startswith("[rank") and "/torch/" in line]
    assert not torch_warnings, "the compiler's remarks are quiet unless TORCH_LOGS asks for them"


@pytest.mark.processes
def test_data_on_device_is_the_same_run_on_cpu(tiny_root: Path, tmp_path: Path, baseline: Path) -> None:
    """On CPU the dataset already lives in the device's memory: the switch must change no bit."""
    train(tiny_root, tmp_path / "off", "speed.data_on_device=false")
    assert_same_weights(tmp_path / "off", baseline)


def test_batches_are_gathered_where_the_data_lives(tiny_root: Path) -> None:
    split = data.load_split(tiny_root, "train").to(torch.device("cpu"))
    sampler = data.train_sampler(len(split), rank=0, world_size=1, seed=1)
    images, labels = next(data.train_batches(split, sampler, 64))
    assert images.device == split.images.device and labels.device == split.labels.device
    assert images.shape == (64, 1, 28, 28)


@pytest.mark.processes
def test_one_rank_trains_without_ddp_to_the_same_bits(tiny_root: Path, tmp_path: Path, one_process_run) -> None:
    """W=1 skips the DDP wrapper (nothing to average); a 1-process torchrun run and a plain
    process (the session's shared one) run the same code path and must agree bit for bit, run
    after run."""
    assert one_process_run.nproc is None
    first = json.loads(RunDir(one_process_run.dir).summary.read_text())
    second, _ = train(tiny_root, tmp_path / "b", *one_process_run.overrides, nproc=1)
    assert first["test_accuracy"] == second["test_accuracy"]
    assert_same_weights(tmp_path / "b", one_process_run.dir)


@pytest.mark.processes
def test_compile_without_a_compiler_is_one_clear_line(tiny_root: Path, tmp_path: Path) -> None:
    no_compilers = tmp_path / "bin"
    no_compilers.mkdir()
    env = {**clean_env(), "PATH": str(no_compilers)}
    env.pop("CXX", None)
    result = run_job(["train", *tiny_overrides(tiny_root, tmp_path / "run", "speed.compile=true")], env=env)
    assert result.returncode == 2
    assert_one_line_error(result, "speed.compile=true needs a C++ compiler", "install g++")
    assert not (tmp_path / "run").exists()


@pytest.mark.processes
@pytest.mark.slow
def test_bench_writes_its_table_between_the_markers(tiny_root: Path, tmp_path: Path) -> None:
    """`make bench` end to end on generated data (one round): the four runs, the table, the
    ratios, the time-to-accuracy table (at a target every recipe reaches after its first epoch,
    since generated digits say nothing of 99%), and the hand-written text around the markers kept.
    Timings are not asserted."""
    out = tmp_path / "PERFORMANCE.md"
    out.write_text("# Speed\n\nanalysis above\n\n<!-- bench:cpu -->\nold table\n<!-- /bench:cpu -->\n\nnotes below\n")
    cmd = [sys.executable, "tests/tools/bench.py", "--rounds", "1", "--data", str(tiny_root), "--out", str(out)]
    cmd += ["--target", "0"]
    cmd += ["data.verify=false", "data.test_batch_size=50"]
    result = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: a target missed on toy data
    text = out.read_text()
    assert text.startswith("# Speed\n\nanalysis above\n") and text.endswith("notes below\n")
    assert "old table" not in text
    rows = ("| (a) | tutorial loop", "| (b) | job, 1 process", "| (c) | job, 2 ranks x 1 thread", "| (d) |", "| (e) |")
    for row in rows:
        assert row in text
    for target in ("(b)/(a)", "(c)/(b)", "(d) batches/s", "test accuracy (b) - (a)", "(e)/(b)"):
        assert target in text
    assert "Machine: " in text and "torch 2.14.1" in text
    assert "| seed recipe | 3 | epoch 1 |" in text and "| fast preset | 4 | epoch 1 |" in text


def _bench_module():
    """tests/tools/bench.py, a script, imported as a module (its main() is not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", REPO / "tests/tools/bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_to_accuracy_adds_each_epochs_loop_and_evaluation_up_to_the_first_at_the_target() -> None:
    """bench.reached on a run's metrics.jsonl events: epoch 1 (60,000 samples at 6,000/s: 10 s of
    loop, then 2 s of evaluation) is below the target, epoch 2 (5 s + 1 s) reaches it."""
    bench = _bench_module()
    events = [
        {"event": "train", "time": 101.0},
        {"event": "train_epoch", "time": 110.0, "epoch": 1, "samples_per_second": 6000.0},
        {"event": "test", "time": 112.0, "epoch": 1, "examples_seen": 60000, "test_accuracy": 0.97},
        {"event": "train_epoch", "time": 118.0, "epoch": 2, "samples_per_second": 12000.0},
        {"event": "test", "time": 119.0, "epoch": 2, "examples_seen": 120000, "test_accuracy": 0.991},
    ]
    result = {"events": events, "started": 100.0}
    assert bench.reached(result, 0.99) == {"epoch": 2, "accuracy": 0.991, "loop_and_eval_s": 18.0, "from_start_s": 19.0}
    assert bench.reached(result, 0.995) is None


def test_a_gpu_time_to_accuracy_row_that_ran_elsewhere_or_failed_is_marked_failed(monkeypatch, tmp_path) -> None:
    """make bench-gpu: a recipe whose run fell back to the CPU, or failed, must not give GPU
    figures; its row says FAILED, the other rows are kept, and the bench does not count as met."""
    bench = _bench_module()
    events = [
        {"event": "train_epoch", "time": 2.0, "epoch": 1, "samples_per_second": 60000.0},
        {"event": "test", "time": 3.0, "epoch": 1, "examples_seen": 60000, "test_accuracy": 0.99},
    ]

    def to_the_end(args, work, recipe):  # noqa: ANN001, ANN202
        if recipe:  # the fast preset: its process failed
            raise bench.RunFailed(["python", "-m", "job"], 1, "Traceback\nRuntimeError: CUDA error")
        return {"device": "cpu", "epochs": 1, "test_accuracy": 0.99, "events": events, "started": 0.0}

    monkeypatch.setattr(bench, "to_the_end", to_the_end)
    args = type("Args", (), {"gpu": True, "target": 0.99})()
    table, ok = bench.time_to_accuracy(args, tmp_path)
    assert not ok
    assert "| seed recipe | | FAILED: ran on 'cpu', not cuda |" in table
    assert "| fast preset | | FAILED (exit 1): RuntimeError: CUDA error |" in table
    monkeypatch.setattr(args, "gpu", False)
    with pytest.raises(bench.RunFailed):  # the CPU report needs every run
        bench.time_to_accuracy(args, tmp_path)
