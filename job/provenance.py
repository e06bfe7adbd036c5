"""Which code ran: the commit a run's summary.json records, so an exported model can name it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REVISION_ENV = "JOB_REVISION"
"""The commit of an image's code: docker/Dockerfile sets it from its REVISION build argument
(`make image` passes `git rev-parse HEAD`); the image holds no .git to ask."""


CHECKOUT = Path(__file__).resolve().parents[1]
"""Where job/ lives: a clone's root, or site-packages (then it has no .git of its own)."""


def source_commit(checkout: Path = CHECKOUT) -> str:
    """The commit of the checkout the job's code is in (40 hex digits, `-dirty` when tracked files
    differ from it), else $JOB_REVISION, else "unknown"."""
    if (checkout / ".git").exists():  # only this checkout's own: never a repository around an installed copy
        try:
            return subprocess.run(
                ["git", "-C", str(checkout), "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):  # no git, or git refuses the directory (another owner)
            pass
    return os.environ.get(REVISION_ENV) or "unknown"
