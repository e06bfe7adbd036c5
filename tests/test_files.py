"""What the job opens (job/files.py): it never writes through a symbolic link planted in its run
directory, it reads only regular files (a FIFO never blocks it, nor reads as "does not exist"), and
a write that fails is one line that fits its errno, which no failing cleanup can hide (issue 22,
cases 3 to 5). Real files, real FIFOs, real full and read-only mounts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    assert_one_line_error,
    checkpoint_steps,
    clean_env,
    make_tiny_mnist,
    mounted_tmpfs,
    run_job,
    run_main,
    tiny_overrides,
    write_random_model,
)
from PIL import Image

from job.errors import EXIT_BAD_INPUT, EXIT_FAILED
from job.run_dir import RunDir

# --- 3. writes through a planted symlink --------------------------------------------------------


@pytest.mark.processes  # the run directory is taken inside a process group: a real process
@pytest.mark.parametrize(
    ("name", "is_dir"),
    [(".lock", False), ("metrics.jsonl", False), ("config.yaml", False), ("checkpoints", True), ("tb", True)],
)
def test_nothing_is_written_through_a_symlink_in_the_run_directory(tiny_root, tmp_path, name, is_dir):
    """Issue 22 case 3: `.lock` -> a file outside the run directory was created and written (42 bytes),
    exit 0. Every entry the job writes in place or into is refused as a link, before any write."""
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    run_dir.mkdir()
    if is_dir:
        outside.mkdir()
    (run_dir / name).symlink_to(outside)
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir)])
    assert result.returncode == EXIT_BAD_INPUT
    assert_one_line_error(result, f"{run_dir / name} is a symbolic link (to {outside})", "remove the link")
    assert (list(outside.iterdir()) == []) if is_dir else not outside.exists(), "written through the link"
    assert sorted(p.name for p in run_dir.iterdir()) == [name], "nothing else written either"


@pytest.mark.processes
def test_plot_writes_nothing_through_a_symlinked_plots_directory(tiny_root, tmp_path, capfd):
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    assert run_job(["train", *tiny_overrides(tiny_root, run_dir, "train.epochs=1")]).returncode == 0
    outside.mkdir()
    RunDir(run_dir).plots.symlink_to(outside)
    result = run_main(capfd, ["plot", str(run_dir), "--data-root", str(tiny_root)])
    assert result.returncode == EXIT_BAD_INPUT
    assert_one_line_error(result, f"{RunDir(run_dir).plots} is a symbolic link")
    assert list(outside.iterdir()) == []


# --- 4. inputs that are not regular files -------------------------------------------------------


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_a_fifo_as_evaluate_checkpoint_is_named_and_never_blocks(tiny_root, tmp_path, capfd):
    """Issue 22 case 4: it said "does not exist"."""
    pipe = fifo(RunDir(tmp_path).model)
    args = ["evaluate", "--checkpoint", str(pipe), *tiny_overrides(tiny_root, tmp_path / "run")]
    result = run_main(capfd, args, timeout=60)
    assert result.returncode == EXIT_BAD_INPUT
    assert_one_line_error(result, f"checkpoint {pipe} is a FIFO (named pipe), not a regular file")


def _inputs(tmp_path: Path, tiny_root: Path) -> dict[str, tuple[list[str], str]]:
    """Every path the job reads, each given as a FIFO (or another kind of non-regular file): the
    command and the start of the line it must print."""
    models = tmp_path / "models"
    models.mkdir()
    write_random_model(models, seed=0)
    png = tmp_path / "digit.png"
    Image.new("L", (28, 28), 255).save(png)
    pipe = fifo(tmp_path / "pipe")
    data = make_tiny_mnist(tmp_path / "data")
    raw = data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw.unlink()
    fifo(raw)
    run_dir = tmp_path / "run"
    plotted = tmp_path / "plotted"
    plotted.mkdir()
    RunDir(plotted).config.write_text("seed: 1\n")
    fifo(RunDir(plotted).metrics)
    return {
        "train --config": (["train", "--config", str(pipe)], f"config file {pipe} is a FIFO (named pipe)"),
        "train.resume": (
            ["train", *tiny_overrides(tiny_root, run_dir, f"train.resume={pipe}")],
            f"train.resume={pipe} is a FIFO (named pipe)",
        ),
        "data file": (["train", *tiny_overrides(data, run_dir)], f"{raw} is a FIFO (named pipe)"),
        "data file, verified": (
            ["train", *tiny_overrides(data, run_dir, "data.verify=true")],
            f"{raw} is a FIFO (named pipe)",
        ),
        "predict image": (
            ["predict", "--checkpoint", str(RunDir(models).model), str(pipe)],
            f"{pipe} is a FIFO (named pipe), not a regular file",
        ),
        "predict --checkpoint": (["predict", "--checkpoint", str(pipe), str(png)], f"checkpoint {pipe} is a FIFO"),
        "predict --model": (["predict", "--model", str(pipe), str(png)], f"model {pipe} is a FIFO (named pipe)"),
        "export --checkpoint": (
            ["export", "--checkpoint", str(pipe), "--format", "safetensors", "--out", str(tmp_path / "m.st")],
            f"checkpoint {pipe} is a FIFO (named pipe)",
        ),
        "evaluate --checkpoint, a directory": (
            ["evaluate", "--checkpoint", str(models), *tiny_overrides(tiny_root, run_dir)],
            f"checkpoint {models} is a directory, not a regular file",
        ),
        "evaluate --checkpoint, a device": (
            ["evaluate", "--checkpoint", "/dev/zero", *tiny_overrides(tiny_root, run_dir)],
            "checkpoint /dev/zero is a character device, not a regular file",
        ),
        "plot metrics.jsonl": (["plot", str(plotted)], f"{RunDir(plotted).metrics} is a FIFO (named pipe)"),
        "plot run directory": (["plot", str(pipe)], f"run directory {pipe} is a FIFO (named pipe)"),
    }


# Read before a process group starts: main() in this process (a blocked read is interrupted after
# run_main's timeout); read by a rank in a process group: a real `python -m job`.
BEFORE_THE_GROUP = [
    "train --config", "predict image", "predict --checkpoint", "predict --model", "export --checkpoint",
    "evaluate --checkpoint, a directory", "evaluate --checkpoint, a device", "plot metrics.jsonl",
    "plot run directory",
]  # fmt: skip
WITH_THE_GROUP = ["train.resume", "data file", "data file, verified"]


@pytest.mark.parametrize("which", BEFORE_THE_GROUP)
def test_every_input_that_is_not_a_regular_file_is_named_and_never_blocks(tiny_root, tmp_path, capfd, which):
    args, needle = _inputs(tmp_path, tiny_root)[which]
    result = run_main(capfd, args, timeout=60)  # a read blocked on the FIFO would time out
    _assert_named(result, needle, tmp_path)


@pytest.mark.processes
@pytest.mark.parametrize("which", WITH_THE_GROUP)
def test_every_input_a_rank_reads_that_is_not_a_regular_file_is_named_and_never_blocks(tiny_root, tmp_path, which):
    args, needle = _inputs(tmp_path, tiny_root)[which]
    result = run_job(args, timeout=180)  # a read blocked on the FIFO would time out
    _assert_named(result, needle, tmp_path)


def _assert_named(result: subprocess.CompletedProcess[str], needle: str, tmp_path: Path) -> None:
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-2000:]
    line = assert_one_line_error(result, needle)
    assert "does not exist" not in line
    assert not (tmp_path / "run").exists()


# --- 5. errors hidden by cleanup ----------------------------------------------------------------


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root) filled to the last byte."""
    with mounted_tmpfs(tmp_path / "full") as path:
        with open(path / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(bytes(4096))
            except OSError:
                pass
        yield path


@pytest.mark.processes
def test_a_volume_full_at_start_is_one_line_that_says_free_space(tiny_root, full_tmpfs):
    """Issue 22 case 5: a traceback `OSError: [Errno 28]` from RunDirLock.acquire, and the other rank
    blamed an OOM kill. Now one line from rank 0, exit 1 (space can be freed: a retry may pass)."""
    run_dir = full_tmpfs / "run"
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir)], nproc=2, launcher="job.launch")
    assert result.returncode == EXIT_FAILED, result.stderr[-3000:]
    line = assert_one_line_error(result, f"cannot write {RunDir(run_dir).lock} (No space left on device); free space")
    assert line.startswith("[rank 0] error:")
    assert "OOM" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.processes
def test_a_run_directory_made_read_only_mid_run_is_the_one_line_seen(tmp_path):
    """Issue 22 case 5: the job's own line was replaced by a traceback `OSError: [Errno 30] Read-only
    file system: '.../.lock'` from RunDirLock.release in a `finally`, and the line said "free space".

    The job runs in a mount namespace of its own; once it has a checkpoint it is paused, the run
    directory is bind-mounted read-only over itself (files already open stay writable: a remount
    of a mount with writers is refused), and it goes on: its next checkpoint cannot be written."""
    root = make_tiny_mnist(tmp_path / "data", train=50 * 64)
    run_dir = tmp_path / "run"
    args = tiny_overrides(root, run_dir, "checkpoint.every_steps=10", "train.log_interval=5")
    log = tmp_path / "log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "job", "train", *args],
            cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not checkpoint_steps(run_dir) if RunDir(run_dir).checkpoints.path.is_dir() else True:
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        job.send_signal(signal.SIGSTOP)
        remount = f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir}"
        subprocess.run(["nsenter", "-t", str(job.pid), "-m", "sh", "-c", remount], check=True)
        job.send_signal(signal.SIGCONT)
        assert job.wait(timeout=240) == EXIT_FAILED, log.read_text()
    finally:
        if job.poll() is None:
            job.kill()
    result = subprocess.CompletedProcess(job.args, job.returncode, "", log.read_text())
    line = assert_one_line_error(result, "(Read-only file system)", "the file system is read-only")
    assert "free space" not in line and "Traceback" not in result.stderr
