"""Console output: the tutorial's log lines from rank 0, rank-tagged lines, a progress bar.

Rank 0 logs progress; every rank logs its warnings. With more than one rank each
line starts with `[rank N]`, so interleaved output from torchrun stays readable.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

LOGGER_NAME = "job"


def setup_logging(rank: int, world_size: int) -> logging.Logger:
    """The job's logger ("job", the parent of every module's `logging.getLogger(__name__)`):
    INFO to stdout on rank 0, WARNING and up to stderr on every rank."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    formatter = logging.Formatter(prefix + "%(message)s")
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


class ProgressBar:
    """One self-redrawing line on a terminal; does nothing when the stream is not a terminal."""

    def __init__(self, total: int, desc: str, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        self.total, self.desc, self.stream = total, desc, stream
        self.enabled = enabled and stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw > 0.1 or self.done >= self.total):
            self._last_draw = now
            self.stream.write("\r\x1b[K" + self.render(now - self.start))
            self.stream.flush()

    def render(self, elapsed: float, width: int = 30) -> str:
        """`Epoch 1 |#####.....| 312/938 85.3 it/s, 0:07 left` (the time left at the rate so far)."""
        filled = width * self.done // max(self.total, 1)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f", {_clock((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total else ""
        return f"{self.desc} |{'#' * filled}{'.' * (width - filled)}| {self.done}/{self.total} {rate:.1f} it/s{left}"

    def clear(self) -> None:
        """Erase the bar so a log line can be printed cleanly; the next update redraws it."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _clock(seconds: float) -> str:
    """Seconds as m:ss (or h:mm:ss)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
