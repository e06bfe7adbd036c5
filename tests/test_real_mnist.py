"""The seed recipe on real MNIST, end to end, as `make train-local` runs it: 2 CPU ranks under
torchrun, MNIST fetched on first use (once, by local rank 0) into the repository's data/."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, assert_ok, assert_one_line_error, read_summary, run_job
from PIL import Image

from job.data import SHA256, missing_files, normalize, raw_dir, read_idx, verify_checksums
from job.model import load_model
from job.run_dir import RunDir

# One worker runs the module (pytest-xdist --dist loadgroup): its one-epoch run is trained once.
pytestmark = [pytest.mark.processes, pytest.mark.xdist_group("real-mnist")]

SEED_ACCURACY = 0.965  # the tutorial reaches 0.9665-0.972 after 3 epochs


@pytest.mark.slow
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


@pytest.mark.slow
def test_predict_reads_test_digits_saved_as_inverted_upscaled_colour_pngs(one_epoch_run, exported, tmp_path):
    """The first 20 test digits as a user's files would be: dark ink on white, 112x112, RGB; read with
    the checkpoint, and with its onnx export through onnxruntime."""
    images = read_idx(raw_dir(REPO / "data") / "t10k-images-idx3-ubyte", ndim=3)[:20]
    labels = read_idx(raw_dir(REPO / "data") / "t10k-labels-idx1-ubyte", ndim=1)[:20].tolist()
    files = []
    for i, pixels in enumerate(images):
        path = tmp_path / f"digit-{i:02d}.png"
        Image.fromarray(255 - pixels.numpy()).resize((112, 112), Image.BICUBIC).convert("RGB").save(path)
        files.append(str(path))
    result = run_job(["predict", "--checkpoint", str(RunDir(one_epoch_run).model), "--json", *files])
    assert_ok(result)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    digits = [record["digit"] for record in records]
    correct = sum(d == label for d, label in zip(digits, labels, strict=True))
    # Measured: 18 of 20, the same two (a 5 read as 6, a 3 read as 8) that this model also
    # misreads in MNIST's own 28x28 form; 934 of the first 1000 read from files, 932 from 28x28.
    assert correct >= 18, f"read {digits}, truth {labels}"

    # The exported onnx file, run by onnxruntime, reads the same files as the checkpoint does.
    result = run_job(["predict", "--model", str(exported["onnx"]), "--json", *files])
    assert_ok(result)
    from_onnx = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in from_onnx] == files and [r["digit"] for r in from_onnx] == digits
    for record, onnx_record in zip(records, from_onnx, strict=True):
        assert np.abs(np.subtract(record["probabilities"], onnx_record["probabilities"])).max() <= 1e-4


@pytest.mark.slow
def test_plot_draws_the_figures_of_a_real_run(one_epoch_run):
    result = run_job(["plot", str(one_epoch_run)], cwd=REPO)
    assert_ok(result)
    for name in ("digits.png", "training_curve.png", "confusion_matrix.png"):
        with Image.open(RunDir(one_epoch_run).plots / name) as image:
            assert image.format == "PNG", name


@pytest.fixture(scope="module")
def exported(one_epoch_run: Path) -> dict[str, Path]:
    """The one-epoch run's model.pt exported as onnx and pt2, beside it."""
    files = {}
    for fmt in ("onnx", "pt2"):
        files[fmt] = one_epoch_run / f"model.{fmt}"
        args = ["export", "--checkpoint", str(RunDir(one_epoch_run).model), "--format", fmt, "--out", str(files[fmt])]
        assert_ok(run_job(args))
    return files


def mnist_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's 10,000 test digits, normalised as the net reads them, and their labels."""
    raw = raw_dir(REPO / "data")
    return normalize(read_idx(raw / "t10k-images-idx3-ubyte", ndim=3)), read_idx(raw / "t10k-labels-idx1-ubyte", 1)


@pytest.mark.slow
def test_onnx_export_reads_all_10000_test_digits_as_torch_does(one_epoch_run, exported):
    import onnxruntime

    images, labels = mnist_test_set()
    with torch.no_grad():
        expected = load_model(RunDir(one_epoch_run).model)(images).numpy()
    session = onnxruntime.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"image": chunk.numpy()})[0] for chunk in images.split(1000)])
    one_by_one = np.concatenate([session.run(None, {"image": image[None].numpy()})[0] for image in images[:20]])
    # Measured: at most 7.6e-6 (float32 rounding: onnxruntime's kernels are not torch's).
    assert np.abs(got - expected).max() <= 1e-4 and np.abs(one_by_one - expected[:20]).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).sum() == 10000, "the same digit for every test image"
    summary = read_summary(one_epoch_run)
    assert (got.argmax(1) == labels.numpy()).mean() == summary["test_accuracy"], "the run's own test figure"

    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["test_accuracy"] == str(summary["test_accuracy"]) and metadata["commit"] == summary["commit"]
    if (REPO / ".git").exists():  # a clone records its commit; an exported tree would say "unknown"
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", summary["commit"]), summary["commit"]


# torch.export.load in a process that never imports this package: the file alone is enough.
PT2_RUNNER = """
import sys, torch
program = torch.export.load(sys.argv[1]).module()
images = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save({"batches": [program(chunk) for chunk in images.split(1000)], "one": program(images[:1])}, sys.argv[3])
"""


@pytest.mark.slow
def test_pt2_export_loaded_in_a_fresh_process_reads_all_10000_test_digits_as_torch_does(
    one_epoch_run, exported, tmp_path
):
    images, _ = mnist_test_set()
    torch.save(images, tmp_path / "images.pt")
    runner = [
        sys.executable,
        "-c",
        PT2_RUNNER,
        str(exported["pt2"]),
        str(tmp_path / "images.pt"),
        str(tmp_path / "out.pt"),
    ]
    assert_ok(subprocess.run(runner, capture_output=True, text=True, timeout=300))
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    model = load_model(RunDir(one_epoch_run).model)
    with torch.no_grad():  # the same batches as the runner's: the same kernels, so the same bits
        assert all(
            torch.equal(got, model(chunk)) for got, chunk in zip(out["batches"], images.split(1000), strict=True)
        )
        assert torch.equal(out["one"], model(images[:1]))
