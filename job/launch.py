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
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable

from job.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED
from job.loopback import is_loopback, loopback_address, tcp_store

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


def _no_restart_after_final_codes() -> None:
    """Make the elastic agent stop, not restart, when a worker exits with a code in FINAL_CODES.

    The agent restarts while `_remaining_restarts > 0` after `_monitor_workers` reports a
    failed group (torch/distributed/elastic/agent/server/api.py, `_invoke_run`); torch has no
    public switch for "do not retry this exit code", so the check wraps that one method.
    """
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = LocalElasticAgent._monitor_workers

    @functools.wraps(monitor)
    def monitor_workers(self, worker_group):  # noqa: ANN001, ANN202 (torch's private signature)
        result = monitor(self, worker_group)
        if result.state == WorkerState.FAILED and {f.exitcode for f in result.failures.values()} & FINAL_CODES:
            self._remaining_restarts = 0
        return result

    LocalElasticAgent._monitor_workers = monitor_workers


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_interrupted_twice = False
"""Whether a second Ctrl-C was passed on to the workers, which then stop at once (exit 130)."""

_stop_signal: signal.Signals | None = None
"""The stop signal this launcher received, if any (set by the handler `_remember_stop_signals` wraps)."""


def _remember_stop_signals() -> None:
    """A stop (SIGTERM, SIGINT) is a stop wherever in torch's agent it lands.

    torch's agent turns these signals into a SignalException raised wherever its main thread
    is (torch/distributed/elastic/multiprocessing/api.py, `_terminate_process_handler`). Raised
    between `try:` and `start = time.time()` in the timing wrapper around the agent's methods
    (torch/distributed/elastic/metrics/api.py, `prof`), it is replaced by that wrapper's own
    UnboundLocalError from its `finally`. torchrun then exits 1 instead of 75 (a preempted pod
    counted as a failure), and closes the rendezvous for every other node, which torch keeps
    open only for a SignalException (torch/distributed/elastic/launcher/api.py, `launch_agent`:
    "when the agent dies with a signal do NOT shutdown the rdzv_handler"); the surviving nodes
    then fail with RendezvousClosedError. Seen once in `make k8s-local-test` (a preempted
    worker pod, torch 2.14.1). Recording the signal here lets `main` and the rendezvous follow
    torch's intent whether or not the exception survived. The agent's own `run` still stops
    and waits for its workers (its `finally` calls `_shutdown`), so they checkpoint as usual.
    """
    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    raise_signal_exception = api._terminate_process_handler

    def remember_then_raise(signum, frame):  # noqa: ANN001, ANN202 (a signal handler)
        global _stop_signal
        _stop_signal = signal.Signals(signum)
        raise_signal_exception(signum, frame)

    # Looked up by name when the agent installs its handlers (`PContext.start`).
    api._terminate_process_handler = remember_then_raise

    close = DynamicRendezvousHandler.shutdown

    @functools.wraps(close)
    def shutdown_unless_stopped(self):  # noqa: ANN001, ANN202 (torch's private signature)
        if _stop_signal in STOP_SIGNALS:
            return True  # left open, as torch leaves it after a SignalException
        return close(self)

    DynamicRendezvousHandler.shutdown = shutdown_unless_stopped


def _pass_a_second_ctrl_c_on() -> None:
    """Ctrl-C reaches only this process (torch starts each worker in a session of its own), and
    the agent passes it on to the workers as SIGINT: each stops at its next checkpoint. While
    the agent waits for that, a second Ctrl-C would end the agent alone (its handler raises)
    and orphan the workers; instead it is passed on too, and the workers stop at once.
    `_shutdown(death_sig)` is where torch's agent signals and then waits for its workers
    (torch/distributed/elastic/agent/server/local_elastic_agent.py)."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    shutdown = LocalElasticAgent._shutdown

    def pass_on(workers: list[int]) -> None:
        global _interrupted_twice
        _interrupted_twice = True
        _signal_groups(workers, signal.SIGINT)

    @functools.wraps(shutdown)
    def shutdown_passing_ctrl_c(self, death_sig=signal.SIGTERM, *args, **kwargs):  # noqa: ANN001, ANN202
        if death_sig == signal.SIGINT and self._pcontext is not None:
            workers = list(self._pcontext.pids().values())
            signal.signal(signal.SIGINT, lambda *_: pass_on(workers))
        return shutdown(self, death_sig, *args, **kwargs)

    LocalElasticAgent._shutdown = shutdown_passing_ctrl_c


def _keep_local_stores_on_loopback() -> None:
    """The agent's TCPStore servers listen on loopback only when their host is loopback, as for
    --standalone (torch/distributed/run.py, `run`: rendezvous endpoint `localhost:0`).

    torch creates them in three places, each a plain TCPStore, which listens on every interface
    (job/loopback.py): the rendezvous store in `_create_tcp_store`
    (torch/distributed/elastic/rendezvous/c10d_rendezvous_backend.py) or in
    `StaticTCPRendezvous.next_rendezvous` (static_tcp_rendezvous.py), and the store the agent
    shares with its workers (unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) in
    `DynamicRendezvousHandler._create_tcp_store_server` (dynamic_rendezvous.py), at this node's
    address. torch has no option for the address: these three get job.loopback.tcp_store, which
    hands a loopback host's server a socket bound to loopback. Other hosts are left as they are.
    """
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    positional = ("world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant")

    def store(host_name, port, *args, **kwargs):  # noqa: ANN001, ANN202 (TCPStore's signature)
        return tcp_store(host_name, port, **dict(zip(positional, args, strict=False)), **kwargs)

    def create_tcp_store_server(self, master_addr, master_port):  # noqa: ANN001, ANN202
        return tcp_store(master_addr, master_port, is_master=True, multi_tenant=True)

    c10d_rendezvous_backend.TCPStore = store
    static_tcp_rendezvous.TCPStore = store
    DynamicRendezvousHandler._create_tcp_store_server = create_tcp_store_server


def _name_this_node_loopback_in_local_runs() -> None:
    """In a run whose rendezvous endpoint is loopback (all its nodes on this host), this node's
    address, the workers' MASTER_ADDR and the shared store's host, is loopback too, not this host's
    name: torch takes `--local-addr` or else `socket.getfqdn()`
    (torch/distributed/elastic/rendezvous/api.py, `RendezvousStoreInfo.build`), which is a LAN
    name on most machines. `config_from_args` (torch/distributed/run.py) is where torchrun's
    arguments become the launch config, after --standalone has set the endpoint. An explicit
    --local-addr is kept; etcd endpoints are left alone (a local etcd gateway serves many hosts).
    """
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    config_from_args = torchrun.config_from_args

    @functools.wraps(config_from_args)
    def config_naming_loopback(args):  # noqa: ANN001, ANN202 (torch's private signature)
        config, cmd, cmd_args = config_from_args(args)
        host, _ = parse_rendezvous_endpoint(config.rdzv_endpoint, default_port=0)
        if config.local_addr is None and config.rdzv_backend in ("c10d", "static") and is_loopback(host):
            config.local_addr = loopback_address(host)
        return config, cmd, cmd_args

    torchrun.config_from_args = config_naming_loopback


STORE_HOST_GONE_GRACE_S = 20.0
"""How long this node's agent keeps watching its workers after the rendezvous store stopped
answering, before it fails as torch's would: enough for workers that are exiting to exit
(seconds, even on a loaded host)."""


def _outlive_the_rendezvous_host_by_a_grace() -> None:
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
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    count = DynamicRendezvousHandler.num_nodes_waiting
    unanswered_since: dict[int, float] = {}

    @functools.wraps(count)
    def num_nodes_waiting(self):  # noqa: ANN001, ANN202 (torch's private signature)
        # Once the store has failed to answer it is not asked again: its host is gone, and each
        # further call would block in the client's reconnect loop (a node of test_hosts.py waited
        # there over 4 minutes with its worker already exited, unreaped).
        first = unanswered_since.get(id(self))
        if first is not None:
            if time.monotonic() - first > STORE_HOST_GONE_GRACE_S:
                raise RendezvousConnectionError(
                    f"the rendezvous store stopped answering {STORE_HOST_GONE_GRACE_S:g} s ago: its host is gone"
                )
            return 0
        try:
            return count(self)
        except RendezvousConnectionError:
            unanswered_since[id(self)] = time.monotonic()
            return 0

    DynamicRendezvousHandler.num_nodes_waiting = num_nodes_waiting


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
    from torch.distributed.run import main as torchrun

    _no_restart_after_final_codes()
    _remember_stop_signals()
    _pass_a_second_ctrl_c_on()
    _keep_local_stores_on_loopback()
    _name_this_node_loopback_in_local_runs()
    _quiet_torch_notices_in_a_terminal()
    _outlive_the_rendezvous_host_by_a_grace()
    try:
        torchrun()
    except ChildFailedError as e:
        return exit_code(failure.exitcode for failure in e.failures.values())
    except SignalException as e:
        # torchrun has already passed the signal on to its workers and waited for them to
        # checkpoint and exit.
        if e.sigval not in STOP_SIGNALS:
            raise
        return EXIT_INTERRUPTED if _interrupted_twice else EXIT_PREEMPTED
    except Exception:
        if _stop_signal in STOP_SIGNALS:  # torch's own error masked the stop (_remember_stop_signals)
            return EXIT_INTERRUPTED if _interrupted_twice else EXIT_PREEMPTED
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
