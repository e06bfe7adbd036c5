"""Which failed collectives a lost peer caused, told apart by their error text, and the one line
that says so (job/errors.py PeerLostError, exit 1): a peer that died, or one that stopped answering."""

from __future__ import annotations

from collections.abc import Callable

from job.errors import PeerLostError, message_line

# Collective failures surface as plain RuntimeErrors; their messages name the transport or,
# when raised from DDP's backward, only what the transport saw.
_COLLECTIVE_MARKERS = (
    "gloo", "NCCL", "ProcessGroup", "c10d",
    "pair closure", "Connection reset by peer", "Connection closed by peer", "Timed out waiting",
)  # fmt: skip
_TIMEOUT_MARKERS = ("Timed out", "timed out", "Timeout", "timeout")


def peer_lost_error(
    error: RuntimeError, timeout_s: int, hang_report: Callable[[], str] | None = None
) -> PeerLostError | None:
    """The one-line report for a collective that failed because of a peer, or None when
    `error` is not a collective failure (a bug, which keeps its traceback). For a timeout,
    `hang_report()` (job/hang.py) says which rank did not arrive and where the stacks are."""
    text = str(error)
    if not any(marker in text for marker in _COLLECTIVE_MARKERS):
        return None
    # gloo's first line: "[/path/to/file.cc:78] What happened. Advice...": keep "What happened".
    detail = message_line(error).split("] ", 1)[-1].split(". ", 1)[0]
    if any(marker in text for marker in _TIMEOUT_MARKERS):
        who = f"; {hang_report()}" if hang_report is not None else ""
        return PeerLostError(
            f"a peer rank stopped answering: no reply within dist.timeout_s={timeout_s} s ({detail}){who}; a rank "
            "that did not arrive is hung (stuck collective, deadlock, paused or swapping process) or its host is "
            "gone: read its log; raise dist.timeout_s only if ranks legitimately wait longer"
        )
    return PeerLostError(
        f"a peer rank died ({detail}); its own log names the cause (OOM kill, preemption, crash); "
        "under torchrun --max-restarts the job restarts and resumes from its newest checkpoint"
    )
