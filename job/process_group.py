"""Process-group setup from the launcher's environment (torchrun, accelerate launch, or none).

`distributed` starts the group from what job/launch_env.py read. With no launcher the job
still gets a (one-member, in-memory) process group, so training and evaluation run one code
path at every world size. Joining is bounded: the rendezvous address must resolve within
dist.timeout_s, torch's C++ retry noise is held back from the console, and a rank stuck in a
handshake that torch's own timeout does not cover exits with one line.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from job.config import DistConfig
from job.device import choose_backend_and_device
from job.errors import EXIT_BAD_INPUT, LaunchError, message_line
from job.hang import Whereabouts
from job.launch_env import LaunchEnv, cpu_threads_per_process, hosts_the_default_store
from job.loopback import all_ranks_here, is_loopback, loopback_address, talk_over_loopback, tcp_store
from job.node_address import talk_over_this_nodes_address


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
    hosts_it = hosts_the_default_store(env.rank)
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
