"""The launcher's description of this process: its rank, the world size, its local rank, the launcher.

torchrun and `accelerate launch` both export RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. With none of them set the job is a
plain single process (rank 0 of 1). Values that contradict each other raise
LaunchEnvError (bad input, exit 2) before any process group is started.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from job.cpu_quota import threads_per_process
from job.errors import LaunchEnvError

_LAUNCH_HINT = "start multi-process jobs with torchrun or accelerate launch, which set these"


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str


def read_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """The launcher's description of this process; inconsistent values raise LaunchError."""
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="none")
    world_size = _int_var(environ, "WORLD_SIZE", minimum=1)
    rank = _int_var(environ, "RANK", minimum=0)
    if rank >= world_size:
        raise LaunchEnvError(f"RANK={rank} must be below WORLD_SIZE={world_size}; {_LAUNCH_HINT}")
    if world_size == 1 and "LOCAL_RANK" not in environ:
        local_rank, local_world_size = 0, 1
    else:
        local_rank = _int_var(environ, "LOCAL_RANK", minimum=0)
        local_world_size = _int_var(environ, "LOCAL_WORLD_SIZE", minimum=1, default=world_size)
    if local_rank >= local_world_size:
        raise LaunchEnvError(
            f"LOCAL_RANK={local_rank} must be below LOCAL_WORLD_SIZE={local_world_size}; {_LAUNCH_HINT}"
        )
    if local_world_size > world_size:
        raise LaunchEnvError(
            f"LOCAL_WORLD_SIZE={local_world_size} exceeds WORLD_SIZE={world_size}: WORLD_SIZE counts "
            "processes on all nodes, not nodes"
        )
    if world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not environ.get(name):
                raise LaunchEnvError(f"{name} is not set for a {world_size}-process job; {_LAUNCH_HINT}")
    launcher = "accelerate" if "ACCELERATE_MIXED_PRECISION" in environ else "torchrun"
    if "TORCHELASTIC_RUN_ID" not in environ and launcher == "torchrun":
        launcher = "env"
    return LaunchEnv(rank, world_size, local_rank, local_world_size, launcher)


def _int_var(environ: Mapping[str, str], name: str, minimum: int, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None:
        if default is not None:
            return default
        raise LaunchEnvError(f"{name} is not set but RANK/WORLD_SIZE are; {_LAUNCH_HINT}")
    try:
        value = int(raw)
    except ValueError:
        raise LaunchEnvError(f"{name}={raw!r} is not an integer; {_LAUNCH_HINT}") from None
    if value < minimum:
        raise LaunchEnvError(f"{name}={value} must be >= {minimum}; {_LAUNCH_HINT}")
    return value


def cpu_threads_per_process(env: LaunchEnv, environ: Mapping[str, str] = os.environ) -> int | None:
    """Threads for intra-op CPU work: the CPUs this process may use (its cgroup's CPU quota, capped
    by its affinity cores) / local processes, at least 1; None when OMP_NUM_THREADS decides
    (job/cpu_quota.py)."""
    return threads_per_process(env.local_world_size, environ)[0]


def hosts_the_default_store(rank: int) -> bool:
    """Whether this rank's process hosts the process group's store: rank 0 does, unless the elastic
    agent hosts it (TORCHELASTIC_USE_AGENT_STORE=True; torch/distributed/rendezvous.py,
    `_create_c10d_store`)."""
    return rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
