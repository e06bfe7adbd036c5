"""`python -m job.launch [torchrun arguments]`: torchrun that never retries bad input, whose
exit status says what its workers did, and whose stores for a run on this host listen on
loopback only.

Every launcher the project ships (make train-local, the image, Kubernetes, Slurm) starts
the job through this module, because plain torchrun (measured with torch 2.14.1):
- restarts the worker group up to --max-restarts times whatever a worker's exit code, so a
  config error found inside the workers was printed four times over ~50 s before failing;
- exits 1 when a worker fails, whatever its code, and 1 again when SIGTERM stops it, so a
  Job's podFailurePolicy or Slurm's RequeueExit could never see 2 or 75;
- with --standalone, listens on every interface for its rendezvous store (and the store it
  shares with its workers), and names this node by its host name, a LAN address on most
  machines (job/loopback.py).

Here a worker that exits 2 (bad input) ends the run at once: no retry can fix it. Any other
failure is still restarted by torchrun's elastic agent, up to --max-restarts: a lost peer, a
crash, and workers that stopped after a checkpoint (75) because a peer on another host was
preempted (the restarted group waits in the rendezvous for that host's replacement). A stop
asked of this launcher itself (SIGTERM) is not restarted. The exit status is the job's own
(2, 75, 130, else 1; `exit_code` below): docs/EXIT-CODES.md.
In a terminal, torch's own notices around a stop ("Received 2 death signal, shutting down
workers", "Sending process N closing signal SIGINT") are left out; LOGLEVEL=WARNING shows them.

torch has no public switch for most of this: the parts of torch's agent replaced here are in
job/torch_private.py, each checked at start. On a torch where one is not as checked, one line
(`job.launch: torch X changed ...`) names what this launcher cannot do there, and that part
behaves as plain torchrun. Where torchrun has an option, it is used instead (--local-addr).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from job import torch_private
from job.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED
from job.loopback import is_loopback, loopback_address, tcp_store

T = TypeVar("T")

FINAL_CODES = frozenset({EXIT_BAD_INPUT, EXIT_INTERRUPTED})
"""Worker exit codes after which the group is not restarted: bad input (a retry cannot help), and
a worker the user interrupted (Ctrl-C twice, sent to it directly)."""


def exit_code(worker_codes: Iterable[int]) -> int:
    """The launcher's exit status for the failed workers' exit codes (negative: killed by that signal).

    A worker that stopped after a checkpoint (75) makes the agent stop its other workers with
    SIGTERM; one that had not started training yet dies of it (-15) rather than exiting 75,
    and that does not make the stop a failure.
    """
    codes = set(worker_codes)
    if EXIT_BAD_INPUT in codes:
        return EXIT_BAD_INPUT
    stopped = {EXIT_PREEMPTED, -signal.SIGTERM, -signal.SIGINT}
    if EXIT_INTERRUPTED in codes and codes <= {EXIT_INTERRUPTED, *stopped}:
        return EXIT_INTERRUPTED
    if EXIT_PREEMPTED in codes and codes <= {EXIT_PREEMPTED, -signal.SIGTERM}:
        return EXIT_PREEMPTED
    return EXIT_FAILED


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_interrupted_twice = False
"""Whether a second Ctrl-C was passed on to the workers, which then stop at once (exit 130)."""

_stop_signal: signal.Signals | None = None
"""The stop signal this launcher received, if any (recorded by `_remember_stop_signal`)."""


def _is_final(worker_codes: set[int]) -> bool:
    """Whether the agent stops, not restarts, after its workers failed with these codes: torch has no
    public switch for "do not retry this exit code" (job/torch_private.py, `stop_restarts_when`)."""
    return bool(worker_codes & FINAL_CODES)


def _remember_stop_signal(sig: signal.Signals) -> None:
    """A stop (SIGTERM, SIGINT) is a stop wherever in torch's agent it lands.

    torch's agent turns these signals into a SignalException raised wherever its main thread
    is. Raised between `try:` and `start = time.time()` in the timing wrapper around the agent's
    methods (torch/distributed/elastic/metrics/api.py, `prof`), it is replaced by that wrapper's own
    UnboundLocalError from its `finally`. torchrun then exits 1 instead of 75 (a preempted pod
    counted as a failure), and closes the rendezvous for every other node, which torch keeps
    open only for a SignalException (torch/distributed/elastic/launcher/api.py, `launch_agent`:
    "when the agent dies with a signal do NOT shutdown the rdzv_handler"); the surviving nodes
    then fail with RendezvousClosedError. Seen once in `make k8s-local-test` (a preempted
    worker pod, torch 2.14.1). Recording the signal here lets `main` and the rendezvous
    (`_stopped`) follow torch's intent whether or not the exception survived. The agent's own `run`
    still stops and waits for its workers (its `finally` signals them), so they checkpoint as usual.
    """
    global _stop_signal
    _stop_signal = sig


def _stopped() -> bool:
    return _stop_signal in STOP_SIGNALS


def _pass_a_second_ctrl_c_on(death_sig: signal.Signals, workers: list[int]) -> None:
    """Ctrl-C reaches only this process (torch starts each worker in a session of its own), and
    the agent passes it on to the workers as SIGINT: each stops at its next checkpoint. While
    the agent waits for that, a second Ctrl-C would end the agent alone (its handler raises)
    and orphan the workers; instead it is passed on too, and the workers stop at once."""
    if death_sig != signal.SIGINT:
        return

    def pass_on(*_: object) -> None:
        global _interrupted_twice
        _interrupted_twice = True
        _signal_groups(workers, signal.SIGINT)

    signal.signal(signal.SIGINT, pass_on)


def torchrun_arguments(argv: list[str]) -> list[str]:
    """torchrun's arguments `argv`, with `--local-addr <loopback>` in front in a run whose rendezvous
    endpoint is loopback (all its nodes on this host): this node's address, the workers' MASTER_ADDR
    and the shared store's host, is then loopback too, not this host's name, which torch takes
    without --local-addr (`socket.getfqdn()`, torch/distributed/elastic/rendezvous/api.py
    `RendezvousStoreInfo.build`) and which is a LAN name on most machines (pytorch/pytorch#73656).
    An explicit --local-addr (or PET_LOCAL_ADDR) is kept; etcd endpoints are left alone (a local
    etcd gateway serves many hosts). Arguments torchrun rejects end the launcher here with
    torchrun's own usage message and exit 2, as torchrun would (`--help` prints its help)."""
    import torch.distributed.run as torchrun

    args = torchrun.parse_args(argv)
    if args.local_addr is not None:
        return argv
    host = _rendezvous_host(args)
    return argv if host is None or not is_loopback(host) else ["--local-addr", loopback_address(host), *argv]


def _rendezvous_host(args: object) -> str | None:
    """The rendezvous endpoint's host as torchrun will use it (torch/distributed/run.py, `run` and
    `get_rdzv_endpoint`), for the c10d and static backends; None for others or a malformed endpoint."""
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
    from torch.distributed.run import parse_min_max_nnodes

    try:
        if args.standalone:
            return "localhost"  # torchrun's endpoint localhost:0
        if args.rdzv_backend == "static" and not args.rdzv_endpoint:
            if args.master_port is None and parse_min_max_nnodes(args.nnodes)[1] == 1:
                return "localhost"  # torchrun runs this as --standalone
            return args.master_addr
        if args.rdzv_backend not in ("c10d", "static"):
            return None
        return parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=0)[0]
    except (RuntimeError, ValueError):
        return None


STORE_HOST_GONE_GRACE_S = 20.0
"""How long this node's agent keeps watching its workers after the rendezvous store stopped
answering, before it fails as torch's would: enough for workers that are exiting to exit
(seconds, even on a loaded host)."""

_unanswered_since: dict[int, float] = {}
"""When each rendezvous handler's store first failed to answer a poll (time.monotonic())."""


def _outlive_the_rendezvous_host_by_a_grace(handler: object, count_waiting_nodes: Callable[[], int]) -> int:
    """A node whose workers exit with bad input (2) reports 2, also when the node that hosts the
    c10d rendezvous store stopped first.

    Bad input that every rank sees at once (ranks disagreeing on the run, job/same_run.py) makes
    every node's workers exit 2 together. The store lives in the host node's agent: that agent
    sees its workers' 2, stops and takes the store with it, while another node's workers are
    still exiting. That node's agent, which polls the store between looks at its workers
    (`rdzv_handler.num_nodes_waiting()` in `_invoke_run`, torch/distributed/elastic/agent/server/
    api.py), then failed with RendezvousConnectionError: exit 1, a run-time failure a scheduler
    retries (seen in 1 of 7 two-node runs here). Within STORE_HOST_GONE_GRACE_S of the first
    failed poll, no node is counted as waiting, so the agent goes on to see its workers' own
    exit codes; after it, the error is raised as before (the host is gone and the workers live on).
    """
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    # Once the store has failed to answer it is not asked again: its host is gone, and each
    # further call would block in the client's reconnect loop (a node of test_hosts.py waited
    # there over 4 minutes with its worker already exited, unreaped).
    first = _unanswered_since.get(id(handler))
    if first is not None:
        if time.monotonic() - first > STORE_HOST_GONE_GRACE_S:
            raise RendezvousConnectionError(
                f"the rendezvous store stopped answering {STORE_HOST_GONE_GRACE_S:g} s ago: "
                "its host is gone, frozen or cut off"
            )
        return 0
    try:
        return count_waiting_nodes()
    except RendezvousConnectionError:
        _unanswered_since[id(handler)] = time.monotonic()
        return 0


STORE_ANSWER_MARGIN_S = 5.0
"""How long past its own timeout (--rdzv-conf read_timeout, 60 s by default) a call to the rendezvous
store may take before this launcher stops waiting for it (seconds): a store that answers at all
answers within its timeout."""

_silent_stores: dict[int, str] = {}
"""The rendezvous backends (by id) whose store did not answer a call in time, with what that call
found: they are asked no more."""


def _answer_within_the_store_timeout(backend: object, timeout_s: float, ask: Callable[[], T]) -> T:
    """The rendezvous store's answer to `ask()` within its own timeout (and STORE_ANSWER_MARGIN_S), or
    RendezvousConnectionError, as from a store whose host is gone.

    A TCPStore call to a server that keeps its connection open but never answers (its host stopped
    by SIGSTOP, hung, or cut off without a reset) outlives its timeout: with torch 2.14.1 a `get` with a
    5 s timeout still blocked after 180 s, and the agent of every other node then waited forever
    (`make k8s-local-test`: 4.5 min after its worker gave up). So each call runs in a thread of its
    own; one that has not returned in time is left there (a daemon thread), and its store is not
    asked again: each further call would queue behind it. The agent then goes on as when the store's
    host is gone (`_outlive_the_rendezvous_host_by_a_grace`): after STORE_HOST_GONE_GRACE_S it stops
    its workers, and this launcher exits 1 with one line (`_launch`).
    """
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    if id(backend) in _silent_stores:
        raise RendezvousConnectionError(_silent_stores[id(backend)])
    outcome: list[tuple[bool, object]] = []

    def call() -> None:
        try:
            outcome.append((True, ask()))
        except BaseException as e:  # handed to the caller as it is, as if raised there  # noqa: BLE001
            outcome.append((False, e))

    thread = threading.Thread(target=call, name="rendezvous-store-call", daemon=True)
    thread.start()
    thread.join(timeout_s + STORE_ANSWER_MARGIN_S)
    if not outcome:
        _silent_stores[id(backend)] = (
            f"the rendezvous store did not answer within {timeout_s + STORE_ANSWER_MARGIN_S:g} s "
            "(its timeout and a margin): its host is frozen, hung or cut off"
        )
        raise RendezvousConnectionError(_silent_stores[id(backend)])
    answered, result = outcome[0]
    if not answered:
        raise result  # type: ignore[misc]
    return result  # type: ignore[return-value]


def _signal_groups(leaders: list[int], sig: signal.Signals) -> None:
    for pid in leaders:
        with contextlib.suppress(ProcessLookupError):  # that worker has already exited
            os.killpg(pid, sig)


def _quiet_torch_notices_in_a_terminal() -> None:
    """torch's elastic agent logs each stop at WARNING (agent/server/api.py "Received N death signal,
    shutting down workers"; multiprocessing/api.py "Sending process N closing signal ..."), between
    the job's own lines. In a terminal the job's lines say it all; in a cluster's log, and whenever
    LOGLEVEL is set (torch reads it for these loggers), they stay."""
    if os.environ.get("LOGLEVEL") or not sys.stderr.isatty():
        return
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main() -> int:
    """torchrun with the changes above; returns the exit status (module docstring). Once it is
    decided, a late Ctrl-C is ignored: it would only interrupt the interpreter's shutdown."""
    try:
        return _launch()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _launch() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import main as torchrun

    argv = torchrun_arguments(sys.argv[1:])
    # Each replaces one part of torch's agent, or, where this torch changed that part, warns in one
    # line and leaves torch's behaviour (job/torch_private.py).
    torch_private.stop_restarts_when(_is_final)
    torch_private.on_stop_signal(_remember_stop_signal)
    torch_private.keep_the_rendezvous_open_when(_stopped)
    torch_private.before_the_agent_stops_its_workers(_pass_a_second_ctrl_c_on)
    torch_private.create_agent_stores_with(tcp_store)
    torch_private.poll_waiting_nodes_through(_outlive_the_rendezvous_host_by_a_grace)
    torch_private.bound_rendezvous_store_calls(_answer_within_the_store_timeout)
    _quiet_torch_notices_in_a_terminal()
    try:
        torchrun(argv)
    except ChildFailedError as e:
        return exit_code(failure.exitcode for failure in e.failures.values())
    except SignalException as e:
        # torchrun has already passed the signal on to its workers and waited for them to
        # checkpoint and exit.
        if e.sigval not in STOP_SIGNALS:
            raise
        return EXIT_INTERRUPTED if _interrupted_twice else EXIT_PREEMPTED
    except Exception as e:
        if _stopped():  # torch's own error masked the stop (_remember_stop_signal)
            return EXIT_INTERRUPTED if _interrupted_twice else EXIT_PREEMPTED
        if isinstance(e, RendezvousConnectionError) and (_silent_stores or _unanswered_since):
            # The agent has stopped this node's workers (its `run` always does on the way out).
            print(
                f"job.launch: error: {e}; this node's workers were stopped: start the job again once the "
                "store's host is back or replaced",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_FAILED
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
