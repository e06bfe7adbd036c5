"""Console: rank-tagged lines, rank 0 alone logs progress, a progress bar only on terminals."""

from __future__ import annotations

import io
import logging

from job.console import ProgressBar, setup_logging


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_only():
    term = _Terminal()
    bar = ProgressBar(10, "Epoch 1", stream=term)
    bar.update(10)
    assert "Epoch 1 |" in term.getvalue() and "10/10" in term.getvalue()
    bar.clear()
    assert term.getvalue().endswith("\r\x1b[K")

    pipe = io.StringIO()
    ProgressBar(10, "Epoch 1", stream=pipe).update(10)
    assert pipe.getvalue() == ""
    quiet = _Terminal()
    ProgressBar(10, "Epoch 1", stream=quiet, enabled=False).update(10)
    assert quiet.getvalue() == ""


def test_rank_tags_and_levels(capsys):
    log = setup_logging(rank=1, world_size=2)
    log.info("hidden on rank 1")
    log.warning("seen")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "[rank 1] seen\n"
    log = setup_logging(rank=0, world_size=1)
    log.info("Train Epoch: 1")
    assert capsys.readouterr().out == "Train Epoch: 1\n"
    logging.getLogger("job").handlers.clear()


def test_the_bar_says_how_long_the_epoch_has_left():
    bar = ProgressBar(1000, "Epoch 1", stream=_Terminal())
    bar.done = 250
    assert bar.render(elapsed=30.0).endswith("250/1000 8.3 it/s, 1:30 left")
    bar.done = 1000
    assert "left" not in bar.render(elapsed=120.0)
