"""plot: three figures from a real run directory; bad run directories are one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_ok, assert_one_line_error, run_job
from PIL import Image

from job.plot import confusion_figure, confusion_matrix, figure_digits
from job.run_dir import RunDir

FIGURES = ("digits.png", "training_curve.png", "confusion_matrix.png")


@pytest.fixture
def tiny_run(one_process_run) -> Path:
    """A real training run (one process, generated data, 2 epochs), shared by the session: plot
    writes into the run directory it reads, so each test plots a copy."""
    return one_process_run.dir


def assert_figures(plots: Path) -> None:
    assert sorted(p.name for p in plots.iterdir()) == sorted(FIGURES), "three figures, no temporary files"
    for name in FIGURES:
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 300, name
        assert (plots / name).stat().st_size < 200_000, f"{name} should stay small"


@pytest.mark.processes
def test_plot_writes_the_three_figures_of_a_run(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    result = run_job(["plot", str(run_dir)])
    assert_ok(result)
    assert result.stdout.splitlines() == [f"wrote {RunDir(run_dir).plots / name}" for name in FIGURES]
    assert_figures(RunDir(run_dir).plots)


@pytest.mark.processes
def test_plot_reads_a_run_that_crashed_mid_line_and_has_only_checkpoints(tiny_run, tmp_path):
    run_dir = tmp_path / "crashed"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("model.pt"))
    with open(RunDir(run_dir).metrics, "a") as f:
        f.write('{"time": 1.0, "event": "tra')
    result = run_job(["plot", str(run_dir)])
    assert_ok(result)
    assert "warning: skipped 1 unreadable line(s)" in result.stderr
    assert_figures(RunDir(run_dir).plots)


@pytest.mark.processes
def test_plot_refuses_bad_run_directories_in_one_line(tiny_run, tmp_path):
    assert_one_line_error(run_job(["plot", str(tmp_path / "nope")]), "run directory", "does not exist")

    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_job(["plot", str(tmp_path / "empty")]), "has no config.yaml", "not a run directory")

    untrained = tmp_path / "untrained"
    shutil.copytree(tiny_run, untrained, ignore=shutil.ignore_patterns("model.pt", "step-*.pt"))
    assert_one_line_error(run_job(["plot", str(untrained)]), "holds no model.pt and no checkpoint yet")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_run, corrupt)
    RunDir(corrupt).model.write_bytes(b"garbage")
    assert_one_line_error(run_job(["plot", str(corrupt)]), "model.pt is truncated or corrupt")
    assert not RunDir(corrupt).plots.exists(), "nothing written on bad input"


def test_confusion_matrix_counts_true_against_predicted():
    labels = torch.tensor([0, 0, 1, 9, 9, 9])
    predictions = torch.tensor([0, 1, 1, 9, 9, 4])
    counts = confusion_matrix(labels, predictions)
    assert counts[0, 0] == 1 and counts[0, 1] == 1 and counts[1, 1] == 1 and counts[9, 9] == 2 and counts[9, 4] == 1
    assert counts.sum() == 6


def test_the_digit_figure_shows_the_misread_digits_first():
    """The tutorial's figure is about mistakes: the first test digits are nearly all read right."""
    labels = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    predictions = torch.tensor([1, 2, 3, 9, 5, 6, 7, 0])
    assert figure_digits(labels, predictions, 4).tolist() == [3, 7, 0, 1]
    assert figure_digits(labels, predictions, 2).tolist() == [3, 7]
    assert figure_digits(labels, labels, 3).tolist() == [0, 1, 2]


def test_the_confusion_matrix_colours_counts_on_a_linear_scale():
    counts = confusion_matrix(torch.tensor([0] * 1000 + [1] * 5), torch.tensor([0] * 1000 + [2] * 5))
    (image,) = confusion_figure(counts).axes[0].get_images()
    assert type(image.norm).__name__ == "Normalize", "a colour must read as a count"
    assert image.norm(500) == pytest.approx(0.5) and image.norm(0) == 0


def test_tensorboards_digit_figure_is_what_torchvision_would_draw():
    """The job tiles the figure itself, so training needs no torchvision (a GPU host's python may lack it)."""
    from torchvision.utils import make_grid

    from job.metrics import _grid

    for count in (6, 5):
        tiles = [torch.randint(0, 256, (1, 126, 112), dtype=torch.uint8) for _ in range(count)]
        expected = make_grid(torch.stack(tiles), nrow=3, padding=2, pad_value=128)
        assert torch.equal(_grid(tiles, columns=3, padding=2, pad_value=128), expected)
