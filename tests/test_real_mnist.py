"""The seed recipe on real MNIST, end to end, as `make train-local` runs it: 2 CPU ranks under
torchrun, MNIST fetched on first use (once, by local rank 0) into the repository's data/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, assert_ok, assert_one_line_error, read_summary, run_job
from PIL import Image

from job.data import SHA256, missing_files, raw_dir, read_idx, verify_checksums

pytestmark = pytest.mark.processes

SEED_ACCURACY = 0.965  # the tutorial reaches 0.9665-0.972 after 3 epochs


def test_seed_recipe_reaches_the_tutorials_accuracy(tmp_path):
    root = REPO / "data"
    fetching = bool(missing_files(root))
    run_dir = tmp_path / "seed"
    # The default, relative data.root ("data"), from the repository: what `make train-local` does.
    result = run_job(["train", f"run.dir={run_dir}"], nproc=2, cwd=REPO, timeout=900)
    assert_ok(result)
    assert result.stdout.count("Fetched MNIST") == (1 if fetching else 0), "exactly one rank fetches"
    verify_checksums(root)
    assert sorted(p.name for p in raw_dir(root).iterdir()) == sorted(SHA256)
    summary = read_summary(run_dir)
    assert summary["world_size"] == 2 and summary["epochs"] == 3 and summary["count"] == 10000
    assert summary["global_step"] == 3 * 938
    assert summary["test_accuracy"] >= SEED_ACCURACY, summary
    shown = f"Test set: Avg. loss: {summary['test_loss']:.4f}, Accuracy: {summary['correct']}/10000 "
    shown += f"({100 * summary['test_accuracy']:.2f}%)"
    assert shown in (REPO / "README.md").read_text(), "README's quick-start figure comes from this run"


def test_data_command_verifies_real_mnist():
    result = run_job(["data", "--root", str(REPO / "data")])
    assert_ok(result)
    assert "MNIST ready and verified in" in result.stdout


def test_data_command_refuses_damaged_files(tiny_root):
    result = run_job(["data", "--root", str(tiny_root)])
    assert_one_line_error(result, "checksum mismatch for", "train-images-idx3-ubyte")


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed recipe for one epoch, one process, on real MNIST (fetched into data/ if missing)."""
    run_dir = tmp_path_factory.mktemp("real") / "one-epoch"
    assert_ok(run_job(["train", f"run.dir={run_dir}", "train.epochs=1"], cwd=REPO, timeout=900))
    return run_dir


def test_predict_reads_test_digits_saved_as_inverted_upscaled_colour_pngs(one_epoch_run, tmp_path):
    """The first 20 test digits as a user's files would be: dark ink on white, 112x112, RGB."""
    images = read_idx(raw_dir(REPO / "data") / "t10k-images-idx3-ubyte", ndim=3)[:20]
    labels = read_idx(raw_dir(REPO / "data") / "t10k-labels-idx1-ubyte", ndim=1)[:20].tolist()
    files = []
    for i, pixels in enumerate(images):
        path = tmp_path / f"digit-{i:02d}.png"
        Image.fromarray(255 - pixels.numpy()).resize((112, 112), Image.BICUBIC).convert("RGB").save(path)
        files.append(str(path))
    result = run_job(["predict", "--checkpoint", str(one_epoch_run / "model.pt"), "--json", *files])
    assert_ok(result)
    digits = [json.loads(line)["digit"] for line in result.stdout.splitlines()]
    correct = sum(d == label for d, label in zip(digits, labels, strict=True))
    # Measured: 18 of 20, the same two (a 5 read as 6, a 3 read as 8) that this model also
    # misreads in MNIST's own 28x28 form; 934 of the first 1000 read from files, 932 from 28x28.
    assert correct >= 18, f"read {digits}, truth {labels}"


def test_plot_draws_the_figures_of_a_real_run(one_epoch_run):
    result = run_job(["plot", str(one_epoch_run)], cwd=REPO)
    assert_ok(result)
    for name in ("digits.png", "training_curve.png", "confusion_matrix.png"):
        with Image.open(one_epoch_run / "plots" / name) as image:
            assert image.format == "PNG", name
