"""How a job process ends: with its exit code, promptly, on every path (done, error, stop).

The process group's C++ objects must not be destroyed while the interpreter runs its own
teardown. Measured on torch 2.13.0 (issue 22, case 2): a rank that had written its checkpoint
hung in 7 of 15 SIGTERM stops until the agent killed it 30 s later, because the DDP reducer,
freed when the error that carried the stop was dropped at the end of `job.__main__.main`'s
`except`, took the last reference to the gloo process group with it, and that group's
destructor, run under the GIL, waits for a gloo worker thread that needs the GIL to release a
finished all-reduce (the pytorch#56297 class); at interpreter shutdown a gloo thread still
running aborted the process instead ("terminate called without an active exception").

So the order is fixed: the job's own teardown runs as before (metrics closed, the run
directory's lock released, `dist.destroy_process_group()`, which ends the group's use), while
everything the last error referenced, and the process groups, stay referenced (keep_until_exit);
then stdout, stderr and the logs are flushed and the process ends with os._exit (exit_now),
which runs no destructor and joins no thread: the kernel closes the sockets. Nothing is lost by
skipping the interpreter's teardown: every file the job writes is written atomically and
fsynced, and TensorBoard's writer is closed by the job itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

_kept: list[object] = []


def keep_until_exit(obj: object) -> None:
    """Hold `obj` (an error with its traceback, a process group) until the process ends, so that
    its destructor never runs (see the module's docstring)."""
    _kept.append(obj)


def exit_now(code: int) -> None:
    """Flush what the user must see, then end the process with `code` at once."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(code)
