"""`python -m job plot RUN_DIR`: the tutorial's figures of a run, as PNG files in RUN_DIR/plots/.

digits.png is the seed's figure (test digits with their ground truth, and here the
prediction too, the misread ones first: the figure is about mistakes), training_curve.png
the tutorial's loss plot (train loss against examples seen, test loss at each epoch's end),
confusion_matrix.png the test set's confusions.
Figures are drawn without pyplot (no display, no global state) and written atomically.
"""

from __future__ import annotations

import errno
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from job import data
from job.config import load_config
from job.errors import BadInputError, RunFailedError, message_line
from job.files import kind_of, not_a_regular_file, read_regular, refuse_symlinks, write_fix
from job.model import load_model
from job.run_dir import RunDir
from job.safe_io import atomic_write_bytes

GRID_ROWS, GRID_COLS = 3, 4
"""The digit figure: 12 test digits (the tutorial shows 6), the misread ones first."""

DPI = 100
"""Small PNGs (tens of KB) that still read well on a screen and in the README."""


def read_events(metrics_file: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's events; a run that crashed mid-line leaves a partial last line, skipped with a warning."""
    events, skipped = [], 0
    text = read_regular(metrics_file, "metrics", "pass a run directory that `train` wrote").decode(errors="replace")
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            skipped += 1
    if skipped:
        print(f"warning: skipped {skipped} unreadable line(s) in {metrics_file}", file=sys.stderr)
    return events


def training_curve(events: list[dict[str, Any]]) -> Figure:
    # A resumed run has already dropped the events past its checkpoint (Metrics), so each step is here once.
    train = [e for e in events if e.get("event") == "train"]
    test = [e for e in events if e.get("event") == "test"]
    if not train:
        raise BadInputError("metrics.jsonl holds no training losses yet; plot a run that has trained for a while")
    fig = Figure(figsize=(7, 4.2), dpi=DPI)
    ax = fig.add_subplot()
    ax.plot([e["examples_seen"] for e in train], [e["loss"] for e in train], color="blue", linewidth=0.8)
    ax.scatter(
        [e.get("examples_seen", _last_seen_in_epoch(train, e["epoch"])) for e in test],
        [e["test_loss"] for e in test],
        color="red",
        zorder=3,
    )
    ax.legend(["Train Loss", "Test Loss"], loc="upper right")
    ax.set_xlabel("number of training examples seen")
    ax.set_ylabel("negative log likelihood loss")
    if test:
        ax.set_title(f"Test accuracy after epoch {test[-1]['epoch']}: {100 * test[-1]['test_accuracy']:.2f}%")
    fig.tight_layout()
    return fig


def _last_seen_in_epoch(train: list[dict[str, Any]], epoch: int) -> int:
    """Runs written before test events carried examples_seen: the epoch's last logged training point."""
    return max(e["examples_seen"] for e in train if e["epoch"] <= epoch)


def figure_digits(labels: torch.Tensor, predictions: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the test digits the figure shows: the first `count` misread ones, in test-set
    order, then (when the model misreads fewer) the first ones it reads right."""
    wrong = (predictions != labels).nonzero().flatten()
    right = (predictions == labels).nonzero().flatten()
    return torch.cat([wrong, right])[:count]


def digits_figure(images: torch.Tensor, labels: list[int], predictions: list[int]) -> Figure:
    """The seed's figure: each digit titled with its ground truth, and the model's prediction (red if wrong)."""
    fig = Figure(figsize=(1.6 * GRID_COLS, 1.9 * GRID_ROWS), dpi=DPI)
    for i, (image, label, pred) in enumerate(zip(images, labels, predictions, strict=True)):
        ax = fig.add_subplot(GRID_ROWS, GRID_COLS, i + 1)
        ax.imshow(image.squeeze(0).numpy(), cmap="gray", interpolation="none")
        ax.set_title(
            f"Ground Truth: {label}\nPrediction: {pred}", fontsize=9, color="black" if label == pred else "red"
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> np.ndarray:
    """counts[true, predicted] over the test set."""
    return torch.bincount(labels * 10 + predictions, minlength=100).view(10, 10).numpy()


def confusion_figure(counts: np.ndarray) -> Figure:
    fig = Figure(figsize=(6, 5.2), dpi=DPI)
    ax = fig.add_subplot()
    # A linear scale, so a colour reads as a count; every cell's count is written in it too, since the
    # confusions (a handful) sit beside a diagonal of about a thousand per digit.
    shown = ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(1, counts.max()))
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    threshold = 0.5 * counts.max()
    for (true, pred), n in np.ndenumerate(counts):
        if n:
            ax.text(
                pred, true, str(n), ha="center", va="center", fontsize=7, color="white" if n > threshold else "black"
            )
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    accuracy = np.trace(counts) / max(1, counts.sum())
    ax.set_title(f"Confusion matrix: {np.trace(counts)}/{counts.sum()} correct ({100 * accuracy:.2f}%)")
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


def model_file(run: RunDir) -> Path:
    """The run's final model.pt, or its newest checkpoint while the run is still going."""
    if run.model.is_file():
        return run.model
    checkpoints = run.checkpoints.files()
    if not checkpoints:
        raise BadInputError(f"{run.path} holds no model.pt and no checkpoint yet; plot it once it has saved one")
    return checkpoints[-1]


def predict_all(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(batch).argmax(dim=1) for batch in images.split(batch_size)])


def run_plot(run_dir: str | Path, data_root: str | None = None) -> list[Path]:
    """Write the three figures of a run directory into its plots/; returns their paths."""
    run = RunDir(Path(run_dir))
    if not run.path.is_dir():
        why = f"is {kind_of(run.path.stat().st_mode)}" if run.path.exists() else "does not exist"
        raise BadInputError(f"run directory {run.path} {why}; pass the directory a training run wrote (runs/<name>)")
    for path in (run.config, run.metrics):
        why = not_a_regular_file(path)
        if why == "does not exist":
            raise BadInputError(
                f"{run.path} has no {path.name}, so it is not a run directory; pass one that `train` wrote"
            )
        if why:
            raise BadInputError(f"{path} {why}; pass a run directory that `train` wrote")
    refuse_symlinks([run.plots])
    cfg = load_config(run.config)
    root = data_root or cfg.data.root
    curve = training_curve(read_events(run.metrics))  # before the slow steps: bad metrics fail fast

    model = load_model(model_file(run), dropout=cfg.model.dropout)
    data.ensure_mnist(root, download=cfg.data.download, verify=cfg.data.verify)
    test = data.load_split(root, "test")
    predictions = predict_all(model, test.images, cfg.data.test_batch_size)

    shown = figure_digits(test.labels, predictions, GRID_ROWS * GRID_COLS)
    figures = {
        "digits.png": digits_figure(
            data.denormalize(test.images[shown]), test.labels[shown].tolist(), predictions[shown].tolist()
        ),
        "training_curve.png": curve,
        "confusion_matrix.png": confusion_figure(confusion_matrix(test.labels, predictions)),
    }
    try:
        run.plots.mkdir(exist_ok=True)
        for name, fig in figures.items():
            save_png(fig, run.plots / name)
    except OSError as e:  # a full disk may pass (exit 1); a read-only directory is the user's to fix (exit 2)
        kind = RunFailedError if e.errno in (errno.ENOSPC, errno.EDQUOT) else BadInputError
        raise kind(
            f"cannot write {run.plots} ({e.strerror or message_line(e)}); the run's other files are unchanged: "
            f"{write_fix(e)} and plot again"
        ) from None
    return [run.plots / name for name in figures]
