"""A file from a newer writer is not a damaged file (issue 21, case 4): a checkpoint whose zip
declares a format version above what this torch reads, or whose own format is newer than this
job's, stops every reader with exit 2 naming both versions; a resume never skips it as corrupt
and never writes over it, and no file is changed."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_ok,
    assert_one_line_error,
    checkpoint,
    make_tiny_mnist,
    run_job,
    run_main,
    snapshot,
    tiny_overrides,
)

from job.checkpoint import CHECKPOINT_FORMAT
from job.run_dir import RunDir
from job.untrusted import readable_archive_version

pytestmark = pytest.mark.processes

NEWER = max(11, readable_archive_version() + 1)
"""The issue's value: an archive of version 11, which torch 2.14 (reads up to 10) refuses."""

CHECKPOINTING = ("train.epochs=1", "checkpoint.every_steps=4", "checkpoint.keep=10")  # steps 4 and 8


def stamp_archive_version(path: Path, version: int) -> None:
    """Rewrite a torch.save file's `archive/version` record, as a newer torch writes it; every
    other record stays as it was."""
    original = path.read_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(original)) as archive, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as copy:
        for entry in archive.infolist():
            record = archive.read(entry.filename)
            copy.writestr(entry, f"{version}\n".encode() if entry.filename.endswith("/version") else record)
    path.write_bytes(out.getvalue())


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, a finished 1-epoch run directory with checkpoints at steps 4 and 8)."""
    base = tmp_path_factory.mktemp("newer")
    root = make_tiny_mnist(base / "data")
    run_dir = base / "run"
    assert_ok(run_job(["train", *tiny_overrides(root, run_dir, *CHECKPOINTING)]))
    return root, run_dir


def interrupted_copy(finished: tuple[Path, Path], dest: Path) -> Path:
    """The run as a kill after its last checkpoint leaves it: checkpoints, no results yet."""
    shutil.copytree(finished[1], dest)
    RunDir(dest).model.unlink()
    RunDir(dest).summary.unlink()
    return dest


def resume(finished: tuple[Path, Path], run_dir: Path, *extra: str):
    return run_job(["train", *tiny_overrides(finished[0], run_dir, *CHECKPOINTING, "train.epochs=2", *extra)])


def test_a_newest_checkpoint_from_a_newer_torch_stops_the_run_and_is_never_overwritten(finished, tmp_path):
    """The issue's case: step 8's archive says version 11. Before: "skipping checkpoint
    step-000000008.pt: ... truncated or corrupt", a resume from step 4, then step 8 overwritten."""
    run_dir = interrupted_copy(finished, tmp_path / "run")
    stamp_archive_version(checkpoint(run_dir, 8), NEWER)
    before = snapshot(run_dir)
    result = resume(finished, run_dir)
    assert result.returncode == 2
    assert_one_line_error(
        result,
        f"checkpoint {checkpoint(run_dir, 8)} was written by a newer torch",
        f"format version {NEWER}",
        f"reads up to version {readable_archive_version()}",
        "use the newer torch",
        "rather than resume from an older checkpoint",
    )
    assert "skipping" not in result.stderr and "corrupt" not in result.stderr
    assert snapshot(run_dir) == before, "every checkpoint byte-identical, nothing written"


def test_the_only_checkpoint_from_a_newer_torch_is_not_called_unloadable(finished, tmp_path):
    run_dir = interrupted_copy(finished, tmp_path / "run")
    checkpoint(run_dir, 4).unlink()
    stamp_archive_version(checkpoint(run_dir, 8), NEWER)
    before = snapshot(run_dir)
    result = resume(finished, run_dir)
    assert result.returncode == 2
    assert_one_line_error(result, "was written by a newer torch", f"format version {NEWER}")
    assert "move them away" not in result.stderr
    assert snapshot(run_dir) == before


def test_a_newer_checkpoint_behind_a_damaged_one_still_stops_the_run(finished, tmp_path):
    """Damaged files are skipped; a newer one further back is not (resuming past it would overwrite it)."""
    run_dir = interrupted_copy(finished, tmp_path / "run")
    stamp_archive_version(checkpoint(run_dir, 4), NEWER)
    checkpoint(run_dir, 8).write_bytes(checkpoint(run_dir, 8).read_bytes()[:5000])
    before = snapshot(run_dir)
    result = resume(finished, run_dir)
    assert result.returncode == 2
    assert "skipping checkpoint step-000000008.pt" in result.stderr
    assert_one_line_error(result, f"checkpoint {checkpoint(run_dir, 4)} was written by a newer torch")
    assert snapshot(run_dir) == before


def test_a_checkpoint_of_a_newer_job_format_stops_the_run(finished, tmp_path):
    """The same kind one level up: our own format number above CHECKPOINT_FORMAT is a newer job's
    checkpoint, not a damaged one (before: skipped, resumed from step 4, step 8 overwritten)."""
    run_dir = interrupted_copy(finished, tmp_path / "run")
    state = torch.load(checkpoint(run_dir, 8), weights_only=True)
    state["format"] = CHECKPOINT_FORMAT + 1
    torch.save(state, checkpoint(run_dir, 8))
    before = snapshot(run_dir)
    result = resume(finished, run_dir)
    assert result.returncode == 2
    assert_one_line_error(
        result, f"has format {CHECKPOINT_FORMAT + 1}, written by a newer version of this job", "run the newer job code"
    )
    assert snapshot(run_dir) == before


def test_train_resume_from_a_newer_torch_file_names_both_versions(finished, tmp_path):
    given = tmp_path / "given.pt"
    shutil.copy(checkpoint(finished[1], 8), given)
    stamp_archive_version(given, NEWER)
    run_dir = tmp_path / "fresh"
    result = resume(finished, run_dir, f"train.resume={given}")
    assert result.returncode == 2
    assert_one_line_error(result, f"checkpoint {given} was written by a newer torch", f"format version {NEWER}")
    assert not run_dir.exists(), "nothing written"


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_every_reader_of_our_files_names_a_newer_torch(finished, tmp_path, capfd, command):
    """evaluate --checkpoint, predict --checkpoint and export --checkpoint read the same files."""
    model = RunDir(tmp_path).model
    shutil.copy(RunDir(finished[1]).model, model)
    stamp_archive_version(model, NEWER)
    out = tmp_path / "model.safetensors"
    image = tmp_path / "digit.png"
    args = {
        "evaluate": ["evaluate", "--checkpoint", str(model), *tiny_overrides(finished[0], tmp_path / "unused")],
        "predict": ["predict", "--checkpoint", str(model), str(image)],
        "export": ["export", "--checkpoint", str(model), "--format", "safetensors", "--out", str(out)],
    }[command]
    if command == "predict":
        from PIL import Image

        Image.new("L", (28, 28)).save(image)
    before = model.read_bytes()
    result = run_main(capfd, args)  # each reads the file before any process group starts
    assert result.returncode == 2
    assert_one_line_error(
        result, f"checkpoint {model} was written by a newer torch", f"format version {NEWER}", "use the newer torch"
    )
    assert model.read_bytes() == before and not out.exists()
