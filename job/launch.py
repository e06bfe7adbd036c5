"""`python -m job.launch [torchrun arguments]`: torchrun that never retries bad input and whose
exit status says what its workers did.

Every launcher the project ships (make train-local, the image, Kubernetes, Slurm) starts
the job through this module, because plain torchrun (measured with torch 2.14.1):
- restarts the worker group up to --max-restarts times whatever a worker's exit code, so a
  config error found inside the workers was printed four times over ~50 s before failing;
- exits 1 when a worker fails, whatever its code, and 1 again when SIGTERM stops it, so a
  Job's podFailurePolicy or Slurm's RequeueExit could never see 2 or 75.

Here a worker that exits 2 (bad input) ends the run at once: no retry can fix it. Any other
failure is still restarted by torchrun's elastic agent, up to --max-restarts: a lost peer, a
crash, and workers that stopped after a checkpoint (75) because a peer on another host was
preempted (the restarted group waits in the rendezvous for that host's replacement). A stop
asked of this launcher itself (SIGTERM) is not restarted. The exit status is the job's own
(job/errors.py):
  2   a worker exited 2: bad input, retrying cannot help
  75  the workers stopped after a checkpoint (75), or SIGTERM or Ctrl-C stopped this
      launcher (its workers checkpoint first): start the same command again to resume
  1   anything else: a run-time failure (a retry may help)
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Iterable

from job.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED

FINAL_CODES = frozenset({EXIT_BAD_INPUT})
"""Worker exit codes after which restarting the group cannot help."""


def exit_code(worker_codes: Iterable[int]) -> int:
    """The launcher's exit status for the failed workers' exit codes (negative: killed by that signal).

    A worker that stopped after a checkpoint (75) makes the agent stop its other workers with
    SIGTERM; one that had not started training yet dies of it (-15) rather than exiting 75,
    and that does not make the stop a failure.
    """
    codes = set(worker_codes)
    if EXIT_BAD_INPUT in codes:
        return EXIT_BAD_INPUT
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


def _pass_a_second_ctrl_c_on() -> None:
    """Ctrl-C reaches only this process (torch starts each worker in a session of its own), and
    the agent passes it on to the workers as SIGINT: each stops at its next checkpoint. While
    the agent waits for that, a second Ctrl-C would end the agent alone (its handler raises)
    and orphan the workers; instead it is passed on too, and the workers stop at once.
    `_shutdown(death_sig)` is where torch's agent signals and then waits for its workers
    (torch/distributed/elastic/agent/server/local_elastic_agent.py)."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    shutdown = LocalElasticAgent._shutdown

    @functools.wraps(shutdown)
    def shutdown_passing_ctrl_c(self, death_sig=signal.SIGTERM, *args, **kwargs):  # noqa: ANN001, ANN202
        if death_sig == signal.SIGINT and self._pcontext is not None:
            workers = list(self._pcontext.pids().values())
            signal.signal(signal.SIGINT, lambda *_: _signal_groups(workers, signal.SIGINT))
        return shutdown(self, death_sig, *args, **kwargs)

    LocalElasticAgent._shutdown = shutdown_passing_ctrl_c


def _signal_groups(leaders: list[int], sig: signal.Signals) -> None:
    for pid in leaders:
        with contextlib.suppress(ProcessLookupError):  # that worker has already exited
            os.killpg(pid, sig)


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    _no_restart_after_final_codes()
    _pass_a_second_ctrl_c_on()
    try:
        torchrun()
    except ChildFailedError as e:
        return exit_code(failure.exitcode for failure in e.failures.values())
    except SignalException as e:
        # torchrun has already passed the signal on to its workers and waited for them to
        # checkpoint and exit.
        if e.sigval not in (signal.SIGTERM, signal.SIGINT):
            raise
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
