"""torchrun whose exit status tells Kubernetes what its workers did.

torchrun exits 1 when a worker fails, whatever the worker's exit code, and 1 again when
SIGTERM stops it (measured with torch 2.14.1: workers exiting 75, 2 or 1, and SIGTERM
to torchrun, all give 1). A Job's podFailurePolicy sees only the container's exit code,
so this runs torchrun in this process and exits with the job's own codes (job/errors.py):
  2   a worker exited 2: bad input, retrying cannot help (the Job fails at once)
  75  every failed worker exited 75, or SIGTERM stopped torchrun: preempted after a
      checkpoint (the pod is replaced without counting a failure, and resumes)
  1   anything else: a run-time failure (counts against backoffLimitPerIndex)

Usage: python torchrun.py [torchrun arguments]   (the image puts job/ on PYTHONPATH)
"""

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

from job.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED


def exit_code(worker_codes: set[int]) -> int:
    if EXIT_BAD_INPUT in worker_codes:
        return EXIT_BAD_INPUT
    if worker_codes == {EXIT_PREEMPTED}:
        return EXIT_PREEMPTED
    return EXIT_FAILED


if __name__ == "__main__":
    try:
        main()
    except ChildFailedError as e:
        sys.exit(exit_code({failure.exitcode for failure in e.failures.values()}))
    except SignalException as e:
        # torchrun has already passed SIGTERM on to its workers and waited for them
        # to checkpoint and exit.
        if e.sigval != signal.SIGTERM:
            raise
        sys.exit(EXIT_PREEMPTED)
