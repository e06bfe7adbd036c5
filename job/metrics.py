"""Where figures go: metrics.jsonl (one JSON object per event) and TensorBoard under tb/.

Only rank 0 writes; the other ranks get NullMetrics, which accepts the same calls
and does nothing, so the training loop never asks "am I rank 0?". A write that fails (a full
disk) stops the metrics and is raised by `check()` at the next point where the ranks agree
(a checkpoint, the end), so every rank stops with one line instead of rank 0 alone.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, ImageDraw

from job.errors import RunFailedError, message_line
from job.files import open_no_follow, write_fix
from job.run_dir import RunDir
from job.safe_io import atomic_write_text

log = logging.getLogger(__name__)


class NullMetrics:
    """The metrics sink of ranks that do not write."""

    def train_step(self, step: int, epoch: int, examples_seen: int, loss: float, lr: float) -> None: ...

    def train_epoch(self, step: int, epoch: int, samples_per_second: float) -> None: ...

    def test(
        self, step: int, epoch: int, examples_seen: int, result: dict[str, Any], digits: torch.Tensor | None
    ) -> None: ...

    def resume(self, step: int, epoch: int, checkpoint: str, world_size: int, previous_world_size: int) -> None: ...

    def check(self) -> None:
        """Raise the first write failure (RunFailedError), if any."""

    def close(self) -> None: ...


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """A Metrics write that records an OSError instead of raising it mid-step (see check())."""

    @functools.wraps(method)
    def write(self: Metrics, *args: Any, **kwargs: Any) -> None:
        if self.failure is None:
            try:
                method(self, *args, **kwargs)
            except OSError as e:
                self.failure = RunFailedError(
                    f"cannot write the metrics in {self.run.path} ({e.strerror or message_line(e)}); the "
                    f"checkpoints are intact: {write_fix(e)} and run the same command again to resume"
                )

    return write


class Metrics(NullMetrics):
    """Rank 0's sink: appends to metrics.jsonl and writes TensorBoard events.

    A resumed run starts at the checkpoint's step, and a killed run may have logged
    past it: those events are dropped (from metrics.jsonl by rewriting it, from
    TensorBoard by its purge_step), so both read like one uninterrupted run.
    """

    def __init__(self, run: RunDir, start_step: int = 0) -> None:
        """Opens metrics.jsonl and TensorBoard's writer; RunFailedError when the disk refuses."""
        from torch.utils.tensorboard import SummaryWriter  # imported here: only rank 0 pays for it

        self.run, self.failure = run, None
        path = run.metrics
        try:
            if path.exists():
                kept = [line for line in path.read_text().splitlines(keepends=True) if _step_of(line) <= start_step]
                atomic_write_text(path, "".join(kept))
            self._jsonl = open(path, "a", buffering=1, opener=open_no_follow)  # noqa: SIM115 (closed in close())
            self._previous_excepthook = threading.excepthook
            threading.excepthook = self._quiet_event_writer
            self._tb = SummaryWriter(log_dir=str(run.tensorboard), purge_step=start_step + 1 if start_step else None)
        except OSError as e:
            raise RunFailedError(
                f"cannot write the metrics in {run.path} ({e.strerror or message_line(e)}); {write_fix(e)} "
                "and run the same command again"
            ) from None

    def _event(self, **fields: Any) -> None:
        self._jsonl.write(json.dumps({"time": round(time.time(), 3), **fields}) + "\n")

    @_guarded
    def train_step(self, step: int, epoch: int, examples_seen: int, loss: float, lr: float) -> None:
        self._event(event="train", step=step, epoch=epoch, examples_seen=examples_seen, loss=loss, lr=lr)
        self._tb.add_scalar("train/loss", loss, step)
        self._tb.add_scalar("train/lr", lr, step)

    @_guarded
    def train_epoch(self, step: int, epoch: int, samples_per_second: float) -> None:
        self._event(event="train_epoch", step=step, epoch=epoch, samples_per_second=samples_per_second)
        self._tb.add_scalar("train/samples_per_second", samples_per_second, step)

    @_guarded
    def test(
        self, step: int, epoch: int, examples_seen: int, result: dict[str, Any], digits: torch.Tensor | None
    ) -> None:
        # examples_seen puts the test loss on the training curve's axis, as the tutorial plots it.
        self._event(event="test", step=step, epoch=epoch, examples_seen=examples_seen, **result)
        self._tb.add_scalar("test/loss", result["test_loss"], step)
        self._tb.add_scalar("test/accuracy", result["test_accuracy"], step)
        if digits is not None:
            self._tb.add_image("test/digits", digits, step)
        self._tb.flush()

    @_guarded
    def resume(self, step: int, epoch: int, checkpoint: str, world_size: int, previous_world_size: int) -> None:
        self._event(
            event="resume",
            step=step,
            epoch=epoch,
            checkpoint=checkpoint,
            world_size=world_size,
            previous_world_size=previous_world_size,
        )

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Flushes and closes both files; a failure now loses the last events, not the run: a warning
        (unless a failure was already reported)."""
        for sink in (self._jsonl, self._tb):
            try:
                sink.close()
            except OSError as e:
                if self.failure is None:
                    why = e.strerror or message_line(e)
                    log.warning(f"the last metrics in {self.run.path} were not written ({why})")
        threading.excepthook = self._previous_excepthook

    def _quiet_event_writer(self, args: threading.ExceptHookArgs) -> None:
        """TensorBoard writes events in a thread, which dies with a traceback on a full disk and
        hands the error to the next call, where _guarded reports it in one line: not twice."""
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            self._previous_excepthook(args)


def _step_of(line: str) -> float:
    """A metrics.jsonl line's step; a torn last line (the writer was killed) counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def digit_grid(pixels: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """The tutorial's figure as one image (3, H, W): each digit enlarged, with
    "truth N pred M" drawn under it, in a grid of 3 columns."""
    tiles = []
    for image, label, pred in zip(pixels, labels.tolist(), predictions.tolist(), strict=True):
        digit = Image.fromarray(image.squeeze(0).numpy(), mode="L")
        size = digit.width * scale
        tile = Image.new("L", (size, size + 14), color=255)
        tile.paste(Image.eval(digit.resize((size, size), Image.NEAREST), lambda p: 255 - p), (0, 0))
        ImageDraw.Draw(tile).text((4, size + 1), f"truth {label} pred {pred}", fill=0)
        tiles.append(torch.frombuffer(bytearray(tile.tobytes()), dtype=torch.uint8).view(1, tile.height, tile.width))
    return _grid(tiles, columns=3, padding=2, pad_value=128)


def _grid(tiles: list[torch.Tensor], columns: int, padding: int, pad_value: int) -> torch.Tensor:
    """Equal-sized (1, H, W) tiles in rows of `columns`, `padding` pixels of `pad_value` around and
    between them, as an RGB (3, H', W') image (what torchvision's make_grid draws; the job does not
    need torchvision to train)."""
    _, height, width = tiles[0].shape
    rows = -(-len(tiles) // columns)
    grid = torch.full(
        (1, rows * (height + padding) + padding, columns * (width + padding) + padding), pad_value, dtype=torch.uint8
    )
    for i, tile in enumerate(tiles):
        top, left = padding + (i // columns) * (height + padding), padding + (i % columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = tile
    return grid.expand(3, -1, -1).contiguous()
