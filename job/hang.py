"""A hang: which ranks did not arrive at the collective that timed out, and where every live rank was.

When a collective times out (a peer stopped, paused, swapping, deadlocked, or its host gone),
each rank that is still alive:
- says in the process group's store which collective it was waiting in, and waits a short
  while for the others to say so too: the ranks that never answer are the stuck ones (a
  stopped process cannot answer; one that is alive answers from its own timeout's handler);
- names the earliest place any rank answered with, so that every live rank's line names the
  same one: a rank stopped halfway through a collective may have done its part for some ranks,
  which get through it and time out in the next collective, while the others time out in it
  (a gather's senders finish without the receiver; in CI, 3 ranks, rank 0 got through a
  collective of step 16 that rank 2 timed out in);
- writes its Python stacks (the wait it timed out in, then every thread) to
  `<run dir>/hang/rank-<N>.txt`.
Nothing of this runs while training goes well: the loop only records which step it is at
(`Whereabouts`, a few attribute stores per step).

On NCCL, torch's watchdog ends the process itself on a timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING
defaults to 3: SIGABRT, no Python handler runs), after writing torch's flight recorder (the last
collectives each rank started and finished, torch/csrc/distributed/c10d/FlightRecorder.hpp):
`flight_recorder_env` points that dump at `<run dir>/hang/nccl-trace-rank-<N>`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import threading
import time
import traceback
from collections.abc import Iterator, MutableMapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from job import torch_private
from job.launch_env import hosts_the_default_store

HANG_DIR = "hang"
ANSWER_WAIT_S = 30
"""The longest the live ranks wait for each other's answer after a timeout, seconds (less when
dist.timeout_s is shorter): they time out within moments of each other, in the collective that
the stuck rank never reached or, for a rank it did its part for before it stopped, the next one."""

FLIGHT_RECORDER_ENTRIES = 2000
"""torch 2.14.1's default ring of collective events (TORCH_FR_BUFFER_SIZE, FlightRecorder.hpp),
said explicitly so that another torch's default does not decide whether anything is recorded."""


@dataclass
class Whereabouts:
    """Which collective this rank is in or heading for: the training step, or another phase."""

    step: int = 0
    """The step being trained (global, 1-based), or, in a phase, the last one trained (0: none yet)."""
    phase: str | None = "starting"
    """What the ranks do outside a step (e.g. "writing a checkpoint"), None while training steps."""
    moves: int = 0
    """How often this rank moved on to a step or a phase. Every rank makes the same moves in the
    same order, so of two ranks' whereabouts the one with fewer moves is the earlier."""

    def start_step(self, step: int) -> None:
        self.step, self.phase, self.moves = step, None, self.moves + 1

    def enter(self, phase: str | None) -> None:
        self.phase, self.moves = phase, self.moves + 1

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        """In `phase` for the block, then back in the phase before it. A block that raises (a
        collective that failed) leaves `phase` named, for the hang report."""
        previous = self.phase
        self.enter(phase)
        yield
        self.enter(previous)

    def collective(self) -> str:
        """E.g. "step 37's collective", "the collective while writing a checkpoint after step 40"."""
        if self.phase is None:
            return f"step {self.step}'s collective"
        return f"the collective while {self.phase}" + (f" after step {self.step}" if self.step else "")


def stacks_file(run_dir: Path, rank: int) -> Path:
    return run_dir / HANG_DIR / f"rank-{rank}.txt"


def flight_recorder_file(run_dir: Path, rank: int) -> Path:
    return run_dir / HANG_DIR / f"nccl-trace-rank-{rank}"


def flight_recorder_env(run_dir: Path, environ: MutableMapping[str, str] = os.environ) -> None:
    """Turn on torch's NCCL flight recorder dump on a collective timeout, into the run directory,
    unless the user set these. Names from torch 2.14.1 (libtorch: TORCH_FR_* supersede the older
    TORCH_NCCL_TRACE_BUFFER_SIZE and TORCH_NCCL_DEBUG_INFO_TEMP_FILE, which torch still reads with
    a deprecation warning); set before the first NCCL process group, read by it."""
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" not in environ:
        environ.setdefault("TORCH_FR_BUFFER_SIZE", str(FLIGHT_RECORDER_ENTRIES))
    environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    if "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in environ:
        # torch appends the rank to this prefix
        environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(run_dir.resolve() / HANG_DIR / "nccl-trace-rank-"))


def make_flight_recorder_dir(run_dir: Path) -> Path | None:
    """`<run dir>/hang/`, where torch's NCCL watchdog writes its dump (it does not make the
    directory), if this host has the run directory; returns it, or None."""
    if not run_dir.is_dir():
        return None
    (run_dir / HANG_DIR).mkdir(exist_ok=True)
    return run_dir / HANG_DIR


def answers_after_timeout(at: Whereabouts, rank: int, world_size: int, timeout_s: int) -> dict[int, Whereabouts] | None:
    """After a collective timed out: tell the other ranks where this rank is, and collect what they
    tell, for up to min(timeout_s, ANSWER_WAIT_S) seconds. Returns {rank: where} of the ranks that
    answered (this one included), or None when the process group's store does not answer either
    (its host is rank 0's process, or torchrun's agent on rank 0's node).

    The exchange runs in a thread this rank stops waiting for: a TCPStore client whose server is
    stopped (SIGSTOP) can wait in `get` past its own timeout (torch 2.14.1, measured).

    The rank whose process hosts the store (rank 0, unless an elastic agent hosts it) then keeps it
    up for up to another wait, until every other rank has said it is done asking: the live ranks
    time out up to seconds apart on a loaded host, and a host that exited after its own exchange
    took the store from a rank still asking (3 ranks, rank 1 stopped, a CI host at load 9-14:
    rank 2's line said "the store did not answer either", 1 run in about 3)."""
    wait_s = max(1, min(timeout_s, ANSWER_WAIT_S))
    hosts_store = hosts_the_default_store(rank)
    answers: dict[int, Whereabouts] = {}
    done = threading.Event()

    def exchange() -> None:
        key, asked = "hang/rank/{}".format, "hang/done/{}".format
        deadline = time.monotonic() + wait_s
        try:
            store = torch_private.default_store()
            store.set_timeout(timedelta(seconds=wait_s))
            store.set(key(rank), json.dumps(asdict(at)))
            heard = {rank: Whereabouts(**asdict(at))}
            while len(heard) < world_size and time.monotonic() < deadline:
                for other in range(world_size):
                    if other not in heard and store.check([key(other)]):
                        heard[other] = Whereabouts(**json.loads(store.get(key(other))))
                time.sleep(0.1)
            store.get(key(rank))  # a reply from the store itself: it is alive
            store.set(asked(rank), "")
        except (RuntimeError, ValueError):  # DistStoreError, DistNetworkError subclass RuntimeError
            return
        answers.update(heard)
        done.set()
        if hosts_store:  # the store is this process's own: asking it cannot block
            others = [asked(other) for other in range(world_size) if other != rank]
            keep_until = time.monotonic() + wait_s
            try:
                while time.monotonic() < keep_until and not store.check(others):
                    time.sleep(0.1)
            except (RuntimeError, ValueError):  # nothing more to keep up
                pass
        kept.set()

    kept = threading.Event()
    threading.Thread(target=exchange, name="hang-report", daemon=True).start()
    if not done.wait(wait_s + 5):
        return None
    if hosts_store:
        kept.wait(wait_s + 5)
    return answers


def write_stacks(run_dir: Path, rank: int, error: BaseException) -> Path | None:
    """This rank's stacks into `<run dir>/hang/rank-<rank>.txt`: where it waited when `error` was
    raised, then every thread now. None when the run directory does not exist (the hang came
    before it was made: a directory made now would be a run without a config)."""
    if not run_dir.is_dir():
        return None
    path = stacks_file(run_dir, rank)
    path.parent.mkdir(exist_ok=True)
    with open(path, "w") as out:
        out.write(f"rank {rank}, pid {os.getpid()}: the collective that timed out was waited for here\n")
        out.writelines(traceback.format_exception(error))
        out.write("\nEvery thread now (faulthandler, most recent call first):\n")
        out.flush()
        faulthandler.dump_traceback(out, all_threads=True)
    return path


def who_did_not_arrive(answers: dict[int, Whereabouts], world_size: int) -> str:
    """The ranks that did not answer and the earliest place any rank answered with (where the job
    stands still), then each rank that got further: the same text on every rank that heard the
    same answers, whichever rank writes it."""
    first = min(answers, key=lambda rank: (answers[rank].moves, rank))
    place = answers[first].collective()
    # A rank with more moves got through every collective before its own place, `place`'s too.
    further = [
        f"rank {rank} got through it and waited at {where.collective()}"
        for rank, where in sorted(answers.items())
        if where.collective() != place
    ]
    missing = [rank for rank in range(world_size) if rank not in answers]
    if missing:
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not arrive at {place}"
    else:
        who = f"every rank answered after the timeout at {place} (a slow rank, not a stopped one)"
    return who + (f" ({'; '.join(further)})" if further else "")


def hang_report(
    at: Whereabouts, rank: int, world_size: int, timeout_s: int, run_dir: Path, backend: str, error: BaseException
) -> str:
    """The line's account of a collective timeout: who did not arrive where, and the files to read."""
    answers = answers_after_timeout(at, rank, world_size, timeout_s)
    if answers is None:
        who = (
            f"no rank could be asked which did not arrive at {at.collective()}: the process group's store did not "
            "answer either (rank 0's process hosts it, or torchrun's agent on rank 0's node): rank 0 is the "
            "likely one"
        )
    else:
        who = who_did_not_arrive(answers, world_size)
    stacks = write_stacks(run_dir, rank, error)
    files = f"this rank's stacks: {stacks}" if stacks else "no run directory yet for this rank's stacks"
    if backend == "nccl":
        files += f"; NCCL flight recorder: {flight_recorder_file(run_dir, rank)}"
    return f"{who}; {files}"
