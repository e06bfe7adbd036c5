"""Hostile and broken inputs, replayed as an attacker with small files would: each case with the
value it must give. Memory is asserted as a bound on the process's peak RSS, never a timing.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_one_line_error, clean_env, mounted_tmpfs, run_job, tiny_overrides, write_random_model
from PIL import Image

from job.config import load_config
from job.errors import ConfigError
from job.run_dir import RunDir

pytestmark = pytest.mark.processes

PEAK_RSS_LIMIT_MB = 1024
"""What a 40 KB input may make a command use: torch alone takes about 650 MB of it."""


# A small process that starts the command and reports its peak RSS. The command cannot be
# measured as pytest's own child: at exec the kernel records the parent's high-water RSS in the
# child's (fs/exec.c, setmax_mm_hiwater_rss on the mm vfork shared), so wait4 would report
# pytest's peak (1,135 MB once the suite had grown) whatever the command used.
MEASURE = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """`python -m job ARGS`: its exit code, stderr, and peak resident memory in MB (from wait4)."""
    with tempfile.NamedTemporaryFile("r") as peak:
        process = subprocess.run(
            [sys.executable, "-c", MEASURE, peak.name, sys.executable, "-m", "job", *args], cwd=REPO,
            env=env or clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        return process.returncode, process.stderr, int(peak.read()) / 1024


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


# --- 1. small input, huge memory ---------------------------------------------------------------


def alias_bomb(levels: int = 9, fan_out: int = 9) -> str:
    """A few hundred bytes of YAML that expand to fan_out**levels items."""
    lines = [f"  l0: &l0 [{', '.join(['lol'] * fan_out)}]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan_out)}]" for i in range(1, levels)]
    return "seed:\n" + "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_one_line_in_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 600
    code, stderr, peak = run_measured(["config", "--config", str(bomb)])
    assert code == 2 and "seed=a mapping of 9 key(s) has the wrong type" in one_error_line(stderr)
    assert peak < PEAK_RSS_LIMIT_MB

    inline = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + ["*a"] * 8) + "]"
    code, stderr, _ = run_measured(["config", f"seed={inline}"])
    assert code == 2 and "seed=a list of 9 item(s)" in one_error_line(stderr)

    run_dir = tmp_path / "run"  # plot reads the run's config.yaml
    run_dir.mkdir()
    RunDir(run_dir).config.write_text(alias_bomb())
    RunDir(run_dir).metrics.write_text('{"event": "train", "step": 1, "epoch": 1, "examples_seen": 0, "loss": 2}\n')
    code, stderr, peak = run_measured(["plot", str(run_dir)])
    assert code == 2 and "has the wrong type" in one_error_line(stderr)
    assert peak < PEAK_RSS_LIMIT_MB


def test_messages_quote_config_values_bounded_whatever_their_size():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["run.name=" + "x/" * 50_000])
    assert len(str(info.value)) < 400


def test_an_image_that_declares_a_huge_size_is_refused_before_decoding(tmp_path):
    model = RunDir(write_random_model(tmp_path, seed=0)).model
    bomb, fine = tmp_path / "bomb.png", tmp_path / "fine.png"
    Image.new("1", (13300, 13300)).save(bomb)  # about 22 KB on disk, 177 megapixels
    digit = Image.new("L", (28, 28))
    digit.paste(255, (12, 4, 16, 24))
    digit.save(fine)
    assert bomb.stat().st_size < 40_000
    code, stderr, peak = run_measured(["predict", "--checkpoint", str(model), str(bomb), str(fine)])
    assert code == 2 and "is 13300x13300 pixels (177 megapixels)" in one_error_line(stderr)
    assert peak < PEAK_RSS_LIMIT_MB


def deflated_bomb(path: Path, declared: int = 1_500_000_000) -> Path:
    """A torch.save archive whose data entry unpacks to `declared` zero bytes, deflated to ~1.5 MB."""
    torch.save({"conv1.weight": torch.zeros(10, 1, 5, 5)}, path.with_suffix(".small"))
    with zipfile.ZipFile(path.with_suffix(".small")) as small, zipfile.ZipFile(path, "w", compresslevel=1) as bomb:
        for entry in small.infolist():
            if entry.filename.endswith("/data/0"):
                deflated = zipfile.ZipInfo(entry.filename)
                deflated.compress_type = zipfile.ZIP_DEFLATED
                with bomb.open(deflated, "w", force_zip64=True) as out:
                    chunk = bytes(1 << 24)
                    for _ in range(declared >> 24):
                        out.write(chunk)
            else:
                bomb.writestr(entry, small.read(entry))
    return path


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deflated_bomb(tmp_path_factory.mktemp("bomb") / "bomb.pt")


def test_a_checkpoint_that_unpacks_to_gigabytes_is_refused_before_loading(zip_bomb, tmp_path):
    assert zip_bomb.stat().st_size < 4 * 2**20
    png = tmp_path / "digit.png"
    Image.new("L", (28, 28), 255).save(png)
    code, stderr, peak = run_measured(["predict", "--checkpoint", str(zip_bomb), str(png)])
    assert code == 2 and "(unpacked) holds 1,424 MiB" in one_error_line(stderr)
    assert peak < PEAK_RSS_LIMIT_MB
    resumed = run_job(["train", f"train.resume={zip_bomb}", f"run.dir={tmp_path / 'run'}"])
    assert_one_line_error(resumed, "unpacked) holds 1,424 MiB")
    assert not (tmp_path / "run").exists()


# --- 2. the run directory is the job's own ---------------------------------------------------


def test_a_second_job_on_a_running_jobs_directory_is_refused_and_touches_nothing(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    # Far more epochs than the test waits for: the first job must still hold the directory when
    # the second arrives however fast this machine is; it is stopped (SIGTERM) afterwards.
    first_args = ["train", *tiny_overrides(tiny_root, run_dir, "train.epochs=10000", "seed=1")]
    first = subprocess.Popen(
        [sys.executable, "-m", "job", *first_args], cwd=REPO, env=clean_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not RunDir(run_dir).config.exists():  # the first job holds the lock and has started
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = run_job(["train", *tiny_overrides(tiny_root, run_dir, "train.epochs=10000", "seed=2")])
    assert first.poll() is None, "the first job ended before the second arrived: the test proves nothing"
    # Refused at once (its holder is a live process of this host), as a run-time condition: a retry
    # may find the directory free, and a scheduler must not fail the job for good (issue 21 case 3).
    assert second.returncode == 1
    line = assert_one_line_error(second, f"run directory {run_dir} is in use by another job (pid {first.pid} on ")
    assert "run.name=<new name>" in line
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 75, err  # stopped at a checkpoint, releasing the lock
    assert "seed: 1" in RunDir(run_dir).config.read_text() and not RunDir(run_dir).lock.exists()


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b", "x y"])
def test_a_run_name_is_a_plain_name(name, tmp_path):
    result = run_job(["train", f"run.name={name}"], cwd=tmp_path)
    assert_one_line_error(result, "run.name=", "must be a plain name")
    assert list(tmp_path.iterdir()) == []


# --- 3. values that break training -------------------------------------------------------------


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=.nan", "model.dropout=.nan", "optim.lr=11"])
def test_numbers_must_be_finite_and_in_their_documented_range(override, tmp_path):
    result = run_job(["train", override, f"run.dir={tmp_path / 'run'}"])
    assert_one_line_error(result, f"{override.split('=')[0]}=", "is out of range")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("log_interval", [1, 3])
def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_root, tmp_path, log_interval):
    """The loss is read one log interval late (issue 25): at 3, checkpoints fall due while a logged
    loss is still pending, and the stop must still come before any non-finite weights are written."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_root, run_dir, "optim.lr=10", f"train.log_interval={log_interval}", "checkpoint.every_steps=2"
    )
    result = run_job(["train", *overrides], nproc=2, launcher="job.launch")
    assert result.returncode == 1, result.stderr[-2000:]
    line = assert_one_line_error(result, "became", "lower optim.lr")
    assert "at step" in line or "by step" in line  # the loss read, or the weights checked at a checkpoint
    assert not RunDir(run_dir).model.exists()
    for path in RunDir(run_dir).checkpoints.files():
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values()), f"{path.name} holds broken weights"


# --- 5. writes that fail -----------------------------------------------------------------------


@pytest.fixture
def nearly_full_dir(tmp_path):
    """A 1 MiB tmpfs (root) with a few KB left: the run's first writes fit, its metrics do not."""
    with mounted_tmpfs(tmp_path / "small") as path:
        with open(path / "filler", "wb") as filler:
            filler.write(bytes(1024 * 1024 - 24 * 1024))
        yield path


def test_a_full_disk_while_logging_metrics_is_one_line(tiny_root, nearly_full_dir):
    run_dir = nearly_full_dir / "run"
    overrides = tiny_overrides(tiny_root, run_dir, "train.log_interval=1", "checkpoint.every_steps=0")
    result = run_job(["train", *overrides])
    assert result.returncode == 1, result.stderr[-2000:]
    line = assert_one_line_error(result, "(No space left on device)")
    assert "free space there and run the same command again" in line
