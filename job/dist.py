"""Process-group setup from the launcher's environment (torchrun, accelerate launch, or none).

torchrun and `accelerate launch` both export RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. With none of them set the job is a
plain single process: it still gets a (one-member, in-memory) process group, so
training and evaluation run one code path at every world size.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from job.config import DistConfig
from job.cpu_quota import threads_per_process
from job.device import choose_backend_and_device
from job.errors import (
    EXIT_BAD_INPUT,
    JobError,
    LaunchEnvError,
    LaunchError,
    PeerFailedError,
    PeerLostError,
    message_line,
)
from job.hang import Whereabouts
from job.loopback import all_ranks_here, is_loopback, loopback_address, talk_over_loopback, tcp_store
from job.node_address import talk_over_this_nodes_address

T = TypeVar("T")

_LAUNCH_HINT = "start multi-process jobs with torchrun or accelerate launch, which set these"


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str


@dataclass(frozen=True)
class DistContext:
    """The live process group's view from this rank."""

    env: LaunchEnv
    backend: str
    device: torch.device
    control_group: dist.ProcessGroup | None = None
    """Group for small CPU-side messages (votes, checkpoint bytes): None = the default group,
    which on gloo is already a CPU group; under NCCL a separate gloo group."""
    at: Whereabouts = field(default_factory=Whereabouts, compare=False)
    """Which collective this rank is in or heading for: what a timeout's report names (job/hang.py)."""

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_leader(self) -> bool:
        """Rank 0: the one process that writes shared files."""
        return self.env.rank == 0

    @property
    def is_local_leader(self) -> bool:
        """Local rank 0: the one process per host that prepares host-local files (data)."""
        return self.env.local_rank == 0


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


@contextmanager
def distributed(cfg: DistConfig, env: LaunchEnv) -> Iterator[DistContext]:
    """A process group for the duration of the block, torn down on success and on error."""
    backend, device = choose_backend_and_device(cfg, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        threads = cpu_threads_per_process(env)
        if threads is not None:
            torch.set_num_threads(threads)
    timeout = timedelta(seconds=cfg.timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    all_here = all_ranks_here()
    if all_here:  # gloo and NCCL would listen on this host's LAN address too (job/loopback.py)
        talk_over_loopback()
    if env.world_size == 1:
        # No peers: an in-memory store needs no address or port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)
    else:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        cannot_join = f"cannot join the process group at {where} within dist.timeout_s={cfg.timeout_s}"
        hint = (
            "check MASTER_ADDR and that every rank started; if another program holds the port, pick a free "
            "MASTER_PORT (or let torchrun pick: --standalone, or --rdzv-endpoint HOST:FREE_PORT)"
        )
        # torch's own timeout does not cover every wait: a client whose MASTER_PORT is held by a
        # program that accepts and never answers waits in the store's handshake indefinitely.
        _wait_until_resolvable(os.environ["MASTER_ADDR"], cfg.timeout_s)
        if not all_here:  # gloo would take its address from the host name: 127.0.1.1 on Debian hosts
            talk_over_this_nodes_address(os.environ["MASTER_ADDR"])
        no_answer = f"{cannot_join}: no answer from the rendezvous; {hint}"
        try:
            with _stderr_held_back() as console, _Deadline(1.25 * cfg.timeout_s + 5, no_answer, console):
                if all_here:
                    store = _store_on_loopback(env, timeout)
                    dist.init_process_group(
                        backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs
                    )
                else:
                    dist.init_process_group(backend, init_method="env://", timeout=timeout, **kwargs)
        except (RuntimeError, ValueError) as e:  # DistStoreError and friends subclass RuntimeError
            raise LaunchError(f"{cannot_join}: {message_line(e)}; {hint}") from None
    try:
        yield DistContext(env=env, backend=backend, device=device, control_group=control_group(backend, timeout))
    finally:
        dist.destroy_process_group()


def _store_on_loopback(env: LaunchEnv, timeout: timedelta) -> dist.Store:
    """The process group's store, as `init_method="env://"` makes it (torch/distributed/rendezvous.py,
    `_create_c10d_store`: rank 0 hosts it unless the elastic agent does, TORCHELASTIC_USE_AGENT_STORE;
    then init_process_group's PrefixStore), but reached over loopback and, when rank 0 hosts it,
    listening on loopback only: for a job whose ranks are all on this host."""
    master_addr = os.environ["MASTER_ADDR"]
    host = loopback_address(master_addr) if is_loopback(master_addr) else "127.0.0.1"
    hosts_it = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = tcp_store(
        host, int(os.environ["MASTER_PORT"]), world_size=env.world_size, is_master=hosts_it, timeout=timeout,
        multi_tenant=True,
    )  # fmt: skip
    return dist.PrefixStore("default_pg", store)


def _wait_until_resolvable(host: str, timeout_s: float) -> None:
    """Return once `host` resolves; LaunchError if it does not within `timeout_s` (a name a fresh
    pod's DNS record has not reached yet resolves a moment later, a misspelt one never)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except (socket.gaierror, UnicodeError) as e:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"MASTER_ADDR={host} does not resolve ({e}) within dist.timeout_s={timeout_s:g}; set it to the "
                    "address (or a resolvable name) of the host that runs rank 0"
                ) from None
        time.sleep(1)


@contextmanager
def _stderr_held_back() -> Iterator[int]:
    """Standard error (fd 2, where torch's C++ logs go) into a discarded file for the block;
    yields a descriptor of the real one. c10d prints dozens of connection retries and C++ stack
    traces while a rendezvous address does not resolve, burying the one line that says what is
    wrong. Setting TORCH_CPP_LOG_LEVEL (e.g. INFO) keeps them on the console, for debugging."""
    console = os.dup(2)
    if os.environ.get("TORCH_CPP_LOG_LEVEL"):
        try:
            yield console
        finally:
            os.close(console)
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield console
        finally:
            os.dup2(console, 2)
            os.close(console)


class _Deadline:
    """A block that must end within `seconds`: otherwise this rank writes `message` as its one
    error line to `console` and exits EXIT_BAD_INPUT at once (the wait it is stuck in cannot be
    interrupted from Python, and nothing has been written yet)."""

    def __init__(self, seconds: float, message: str, console: int) -> None:
        self._timer = threading.Timer(seconds, self._expire, args=(message, console))
        self._timer.daemon = True

    def __enter__(self) -> None:
        self._timer.start()

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    @staticmethod
    def _expire(message: str, console: int) -> None:
        tag = f"[rank {os.environ.get('RANK', '?')}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        os.write(console, f"{tag}error: {message}\n".encode())
        os._exit(EXIT_BAD_INPUT)


def control_group(backend: str, timeout: timedelta) -> dist.ProcessGroup | None:
    """The group for small CPU-side messages: None (the default group) on gloo; under another
    backend a gloo group over the same ranks, with the job's timeout (new_group's own default is
    torch's 30 minutes, not dist.timeout_s)."""
    return dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None


def mean_in_rank_order(state, bucket):  # unannotated: DDP rejects this module's string annotations
    """A DDP communication hook: the mean of a gradient bucket over ranks, through an all-gather
    and a sum in rank order instead of the backend's all-reduce.

    Why on every backend: an all-reduce's summation order for an element depends on where the
    element sits in the bucket (ring and tree algorithms split the buffer into chunks), and DDP
    rebuilds its buckets in gradient-ready order after the first step. A process that resumes
    from a checkpoint reduces its first step in the initial order, an uninterrupted one in the
    rebuilt order, so at 3+ ranks the bits could differ. Summed here element by element in rank
    order, each gradient's bits depend on neither. Like DDP's own hook it divides before summing,
    so at 2 ranks the bits equal the all-reduce's (a + b == b + a).

    Cost: gloo on loopback here (2 ranks, the net's 85 KB of gradients): all-reduce 1.7 ms,
    all-gather 0.6 ms, so it is also the faster one there. Under NCCL it moves W x 85 KB per
    step instead of about 2 x 85 KB: microseconds on NVLink or PCIe for this net.
    """
    tensor = bucket.buffer().div_(dist.get_world_size())
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    gathered = dist.all_gather(parts, tensor, async_op=True).get_future()

    def sum_in_rank_order(_: torch.futures.Future) -> torch.Tensor:
        total = parts[0]
        for part in parts[1:]:
            total += part
        return total

    return gathered.then(sum_in_rank_order)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op at world size 1 apart from the call)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def on_some_ranks(ctx: DistContext, chosen: bool, step: str, action: Callable[[], T]) -> T | None:
    """`action()` on the chosen ranks only (fetching data, creating the run directory), then
    agree: if it failed anywhere, every rank stops instead of waiting for that rank forever.
    Returns what `action` returned on the chosen ranks, None on the others; a failure raises
    the JobError itself on the rank that hit it and PeerFailedError (same exit code) elsewhere."""
    result, error = None, None
    previous, ctx.at.phase = ctx.at.phase, step
    if chosen:
        try:
            result = action()
        except JobError as e:
            error = e
    # The highest exit code of any rank (0: none failed): peers stop with the failed rank's code.
    code = torch.tensor([error.exit_code if error is not None else 0], device=ctx.device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if code.item():
        raise PeerFailedError(f"another rank failed while {step}", exit_code=int(code.item()))
    ctx.at.phase = previous
    return result


def broadcast_bytes(ctx: DistContext, data: bytes | None) -> bytes:
    """Rank 0's bytes on every rank (a checkpoint file, so that ranks on hosts without the
    shared volume resume too, and every rank loads it weights-only itself)."""
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=0, group=ctx.control_group)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if ctx.is_leader and data else None
    if buffer is None:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8)
    if buffer.numel():
        dist.broadcast(buffer, src=0, group=ctx.control_group)
    return buffer.numpy().tobytes()


def gather_to_leader(ctx: DistContext, obj: object) -> list[object] | None:
    """Every rank's `obj` on rank 0, in rank order (None on the other ranks)."""
    gathered: list[object] | None = [None] * ctx.world_size if ctx.is_leader else None
    dist.gather_object(obj, gathered, dst=0, group=ctx.control_group)
    return gathered


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
