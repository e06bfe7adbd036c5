"""`python tests/probes/stop_itself.py WHERE train KEY=VALUE...`: `python -m job train ...` on one
rank of a group started by hand, except that rank 1 stops itself with SIGSTOP (as a stopped,
swapped-out or deadlocked rank would) at an exact point, not wherever a test's signal lands:
- `hook:N`: in DDP's gradient hook of its N-th step, before that step's all-gather;
- `gather`: before its first checkpoint's gather of every rank's RNG streams (a gather: the
  ranks that only send finish it, rank 0 waits).
The other ranks run the job unchanged."""

import os
import runpy
import signal
import sys

from job.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels(native=False)  # before torch runs a kernel, as `python -m job` does

import torch.distributed.distributed_c10d as c10d  # noqa: E402

import job.collectives  # noqa: E402

where, job_args = sys.argv[1], sys.argv[2:]


def stop_here() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


if os.environ["RANK"] == "1":
    if where.startswith("hook:"):
        stop_at, hook, calls = int(where.removeprefix("hook:")), job.collectives.mean_in_rank_order, []

        def stopping_hook(state, bucket):  # one bucket per step: this net's 85 KB of gradients
            calls.append(None)
            if len(calls) == stop_at:
                stop_here()
            return hook(state, bucket)

        job.collectives.mean_in_rank_order = stopping_hook  # before job.train imports it
    elif where == "gather":
        gather = c10d.gather

        def stopping_gather(*args, **kwargs):
            stop_here()
            return gather(*args, **kwargs)

        c10d.gather = stopping_gather  # what dist.gather_object calls
    else:
        sys.exit(f"stop_itself.py: unknown place {where!r}")

sys.argv = ["job", *job_args]
runpy.run_module("job", run_name="__main__", alter_sys=True)
