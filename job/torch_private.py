"""Every private name of torch the job uses, in one place: the parts of torch's elastic agent that
`python -m job.launch` replaces, each checked before it is replaced, and two functions the workers
call. job/launch.py decides what the launcher does (its docstring says why); this module knows where
in torch that has to happen, and that torch promises none of it.

Each target, as a table (torch/distributed/elastic/ unless named otherwise; "checked on": the
check below and the launcher tests passed on that torch; "upstream": the torch issue, if any, that
asks for what the replacement provides):

LocalElasticAgent._monitor_workers (agent/server/local_elastic_agent.py)
    what      the agent's look at its workers, each --monitor-interval; `SimpleElasticAgent._invoke_run`
              restarts a FAILED group while `_remaining_restarts > 0`
    why       no restart after a worker exits 2 (bad input) or 130: torch has no public switch
              for "do not retry this exit code"
    checked   2.13.0, 2.14.1
    upstream  pytorch/pytorch#133877 (open): "Torch Distributed Elastic has no way to address
              non-retriable errors"
LocalElasticAgent._shutdown (same file)
    what      signals the workers (`death_sig`) and waits for them; `SimpleElasticAgent.run` calls it
              with the signal that stopped the agent
    why       a second Ctrl-C while the workers checkpoint is passed on to them, not ending the agent alone
    checked   2.13.0, 2.14.1
    upstream  none found
api._terminate_process_handler (multiprocessing/api.py)
    what      the agent's SIGTERM/SIGINT handler, looked up by name in `PContext.start`; raises SignalException
    why       remember the stop even where torch's timing wrapper (metrics/api.py `prof`) replaces the
              SignalException by its own UnboundLocalError
    checked   2.13.0, 2.14.1
    upstream  none found
DynamicRendezvousHandler.shutdown (rendezvous/dynamic_rendezvous.py)
    what      closes the rendezvous for every node; torch/distributed/launcher/api.py `launch_agent` calls
              it unless the agent ended with a SignalException
    why       leave it open after a masked stop too, as torch does after an unmasked one
    checked   2.13.0, 2.14.1
    upstream  related: pytorch/pytorch#147064 (open): RendezvousClosedError on the other nodes
c10d_rendezvous_backend.TCPStore (rendezvous/c10d_rendezvous_backend.py)
    what      torch.distributed.TCPStore as `_create_tcp_store` looks it up: the c10d rendezvous store
    why       a loopback host's store listens on loopback only: TCPStore binds every interface and has no
              address option, but takes a socket bound beforehand (`master_listen_fd`, job/loopback.py)
    checked   2.13.0, 2.14.1
    upstream  pytorch/pytorch#173909 (closed): "Security Issues of All-Zero Listening Created by TCPStore";
              pytorch/pytorch#155741 (closed, not merged): a bind address for torch.distributed
static_tcp_rendezvous.TCPStore (rendezvous/static_tcp_rendezvous.py)
    what      the same, as `StaticTCPRendezvous.next_rendezvous` looks it up (the static rendezvous,
              --master-addr/--master-port, accelerate's)
    why, checked, upstream: as above
DynamicRendezvousHandler._create_tcp_store_server (rendezvous/dynamic_rendezvous.py)
    what      creates the store the agent shares with its workers (unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1),
              called by `next_rendezvous`
    why, checked, upstream: as above
C10dRendezvousBackend._call_store (rendezvous/c10d_rendezvous_backend.py)
    what      every call the c10d rendezvous backend makes to its TCPStore (`get_state`, `set_state`:
              joining, heartbeats, the agent's polls, closing), turning store errors into
              RendezvousConnectionError
    why       a call to a store whose host is frozen (SIGSTOP, a hung or cut-off node) never returns,
              whatever its timeout (2.14.1: a `get` with a 5 s timeout still blocked after 180 s; the
              agent then waits forever): the launcher gives each call the store's timeout and 5 s more
              (job/launch.py `_answer_within_the_store_timeout`)
    checked   2.13.0, 2.14.1
    upstream  none found for a frozen server; related: pytorch/pytorch#53840 (closed): "TCPStore.wait hangs"
DynamicRendezvousHandler.num_nodes_waiting (rendezvous/dynamic_rendezvous.py)
    what      polls the rendezvous store between looks at the workers (`_invoke_run`, while the group is
              healthy); raises RendezvousConnectionError when the store does not answer
    why       a node whose workers exit 2 just after the store's host left still reports 2 (job/launch.py
              `_outlive_the_rendezvous_host_by_a_grace`)
    checked   2.13.0, 2.14.1
    upstream  none found

Called, not replaced (in the job's workers; `functions` below, checked by `changes` too):

distributed_c10d._get_default_store (torch/distributed/distributed_c10d.py)
    what      the default process group's store
    why       job/hang.py: after a collective timed out, each live rank says in it where it waited, so
              the line names the rank that never answered; torch has no public accessor
    checked   2.13.0, 2.14.1 (where missing: the hang line names no rank, as when the store is gone)
    upstream  none found
_weights_only_unpickler._get_allowed_globals (torch/_weights_only_unpickler.py)
    what      the globals torch.load(weights_only=True) accepts by default
    why       job/untrusted.py tells a checkpoint that is not weights-only (a pickle naming other globals)
              apart from a damaged one before loading it; torch exposes only what a process added
              (`torch.serialization.get_safe_globals`)
    checked   2.13.0, 2.14.1 (where missing: job/untrusted.py's own short list)
    upstream  none found

Not replaced: torch.distributed.run's `config_from_args` was, to name a local run's node by loopback;
torchrun's public `--local-addr` does it now (job/launch.py `torchrun_arguments`; why: pytorch/pytorch#73656).

The check (`change`), for each target: it exists and is callable; its parameters are the ones it had
when checked (inspect.signature; for TCPStore, built in C++, its docstring's signature line); a
module-level name is still the object the launcher means to replace (TCPStore is torch.distributed's);
and torch still looks the name up where the replacement takes effect: the torch function that calls it
still names it in its code (`co_names`), with the attributes the replacement reads. Where one is not,
torch's own object stays in place and the launcher prints one line naming what it cannot do on this
torch, e.g. `job.launch: torch 2.15.0 changed LocalElasticAgent._monitor_workers (missing); a worker's
exit 2 (bad input) is restarted like any failure, up to --max-restarts (plain torchrun behaviour)`:
never a crash, never a silent change. "Checked on" means tests/test_torch_private.py, test_launch.py
and test_listeners.py passed on that torch (2026-12-06: 2.14.1 as pinned, 2.13.0 as a CPU build);
on 2.14.1 also test_hosts.py and test_faults.py's stop tests (SIGTERM, Ctrl-C).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_AGENT = "torch.distributed.elastic.agent.server.local_elastic_agent"
_AGENT_API = "torch.distributed.elastic.agent.server.api"
_PROCESSES = "torch.distributed.elastic.multiprocessing.api"
_DYNAMIC = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"
_C10D = "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend"
_STATIC = "torch.distributed.elastic.rendezvous.static_tcp_rendezvous"
_TCP_STORE_PARAMETERS = (
    "host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant",
    "master_listen_fd", "use_libuv",
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One name in torch that the launcher replaces, as it was when checked (the module docstring's table)."""

    module: str
    name: str
    """Dotted within `module`, as the warning names it: `LocalElasticAgent._monitor_workers`."""
    parameters: tuple[str, ...]
    looked_up_by: str
    """The torch function, `module:dotted.name`, whose code must name the target for a replacement to take effect."""
    lost: str
    """What the launcher cannot do where the target is not as checked (torch's own behaviour then)."""
    reads: tuple[str, ...] = ()
    """Further names (attributes) the replacement relies on, in `looked_up_by`'s code or the target's own."""
    same_as: str | None = None
    """For a module-level alias: the object, `module:name`, it must still be."""

    @property
    def attribute(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def label(self) -> str:
        """How the table and the warning name it: a module-level name with its module's last part."""
        return self.name if "." in self.name else f"{self.module.rsplit('.', 1)[-1]}.{self.name}"


MONITOR_WORKERS = Target(
    _AGENT, "LocalElasticAgent._monitor_workers", ("self", "worker_group"),
    looked_up_by=f"{_AGENT_API}:SimpleElasticAgent._invoke_run", reads=("_remaining_restarts",),
    lost="a worker's exit 2 (bad input) is restarted like any failure, up to --max-restarts",
)  # fmt: skip
SHUTDOWN_WORKERS = Target(
    _AGENT, "LocalElasticAgent._shutdown", ("self", "death_sig", "timeout"),
    looked_up_by=f"{_AGENT_API}:SimpleElasticAgent.run", reads=("_pcontext",),
    lost="a second Ctrl-C stops this launcher alone and leaves its workers to finish their checkpoint",
)  # fmt: skip
STOP_SIGNAL_HANDLER = Target(
    _PROCESSES, "_terminate_process_handler", ("signum", "frame"),
    looked_up_by=f"{_PROCESSES}:PContext.start",
    lost="a SIGTERM that torch's timing wrapper masks exits 1 and closes the rendezvous for the other nodes",
)  # fmt: skip
CLOSE_RENDEZVOUS = Target(
    _DYNAMIC, "DynamicRendezvousHandler.shutdown", ("self",),
    looked_up_by="torch.distributed.launcher.api:launch_agent", reads=("SignalException",),
    lost="a stop that torch's timing wrapper masks closes the rendezvous for the other nodes",
)  # fmt: skip
C10D_STORE = Target(
    _C10D, "TCPStore", _TCP_STORE_PARAMETERS, looked_up_by=f"{_C10D}:_create_tcp_store",
    same_as="torch.distributed:TCPStore",
    lost="a local run's c10d rendezvous store listens on every interface, not loopback only",
)  # fmt: skip
STATIC_STORE = Target(
    _STATIC, "TCPStore", _TCP_STORE_PARAMETERS, looked_up_by=f"{_STATIC}:StaticTCPRendezvous.next_rendezvous",
    same_as="torch.distributed:TCPStore",
    lost="a local run's static rendezvous store listens on every interface, not loopback only",
)  # fmt: skip
SHARED_STORE = Target(
    _DYNAMIC, "DynamicRendezvousHandler._create_tcp_store_server", ("self", "master_addr", "master_port"),
    looked_up_by=f"{_DYNAMIC}:DynamicRendezvousHandler.next_rendezvous",
    lost="the store a local run's agent shares with its workers listens on every interface "
    "(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 does without it)",
)  # fmt: skip
STORE_CALL = Target(
    _C10D, "C10dRendezvousBackend._call_store", ("self", "store_op", "args", "kwargs"),
    looked_up_by=f"{_C10D}:C10dRendezvousBackend.get_state", reads=("_store",),
    lost="an agent whose rendezvous store's host froze (stopped, hung, cut off) waits for it forever",
)  # fmt: skip
NODES_WAITING = Target(
    _DYNAMIC, "DynamicRendezvousHandler.num_nodes_waiting", ("self",),
    looked_up_by=f"{_AGENT_API}:SimpleElasticAgent._invoke_run",
    lost="a node whose workers exit 2 just after the rendezvous store's host left may exit 1",
)  # fmt: skip

TARGETS = (
    MONITOR_WORKERS, SHUTDOWN_WORKERS, STOP_SIGNAL_HANDLER, CLOSE_RENDEZVOUS,
    C10D_STORE, STATIC_STORE, SHARED_STORE, STORE_CALL, NODES_WAITING,
)  # fmt: skip


def _resolve(module: str, dotted: str) -> Any:  # noqa: ANN401 (any object in torch)
    """`module.dotted`; ImportError or AttributeError where it is missing."""
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _parameters(obj: Callable) -> tuple[str, ...]:
    """The names of `obj`'s parameters; for a class built in C++ (pybind11), from the signature line
    its `__init__` docstring starts with (`__init__(self: ..., host_name: str, port: ...) -> None`)."""
    try:
        return tuple(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        lines = (getattr(obj, "__init__", obj).__doc__ or "").splitlines()
        names = re.findall(r"[(,]\s*(\w+)\s*:", lines[0] if lines else "")
        return tuple(name for name in names if name != "self")


def _code_names(function: object) -> tuple[str, ...]:
    code = getattr(inspect.unwrap(function), "__code__", None)  # type: ignore[arg-type]
    return code.co_names if code is not None else ()


def change(target: Target) -> str | None:
    """What about `target` differs from when it was checked (the module docstring's rules), or None."""
    try:
        obj = _resolve(target.module, target.name)
    except (ImportError, AttributeError):
        return "missing"
    if not callable(obj):
        return "not callable"
    if target.same_as is not None and obj is not _resolve(*target.same_as.split(":")):
        return f"no longer {target.same_as.replace(':', '.')}"
    parameters = _parameters(obj)
    if parameters != target.parameters:
        return f"parameters ({', '.join(parameters)}), checked with ({', '.join(target.parameters)})"
    caller_module, caller_name = target.looked_up_by.split(":")
    try:
        caller = _resolve(caller_module, caller_name)
    except (ImportError, AttributeError):
        return f"{caller_name}, which used it, is missing"
    looked_up = _code_names(caller)
    if target.attribute not in looked_up:
        return f"no longer used by {caller_name}"
    for name in target.reads:
        if name not in looked_up and name not in _code_names(obj):
            return f"{name} no longer used by {caller_name} or {target.name}"
    return None


def changes() -> dict[str, str]:
    """Each target that differs from when it was checked, by label: what differs. Empty on a torch
    the table lists."""
    found = {target.label: found for target in TARGETS if (found := change(target)) is not None}
    for module, name in (DEFAULT_STORE, ALLOWED_GLOBALS):
        try:
            if not callable(_resolve(module, name)) or _parameters(_resolve(module, name)) != ():
                found[name] = "not a function without parameters"
        except (ImportError, AttributeError):
            found[name] = "missing"
    return found


def _warn(target: Target, found: str) -> None:
    import torch

    line = f"job.launch: torch {torch.__version__} changed {target.label} ({found}); {target.lost}"
    print(f"{line} (plain torchrun behaviour)", file=sys.stderr, flush=True)


def _replace(target: Target, make: Callable[[Any], Any]) -> bool:
    """Set `target` to `make(torch's object)` if it is as checked; else leave it, warn, return False."""
    found = change(target)
    if found is not None:
        _warn(target, found)
        return False
    owner_name, _, attribute = target.name.rpartition(".")
    owner = _resolve(target.module, owner_name) if owner_name else importlib.import_module(target.module)
    setattr(owner, attribute, make(getattr(owner, attribute)))
    return True


# --- the replacements: each keeps torch's behaviour and calls the launcher's rule at one place ---------


def stop_restarts_when(final: Callable[[set[int]], bool]) -> None:
    """The agent restarts a failed worker group no more once `final(the failed workers' exit codes)`:
    `_monitor_workers` reports the group's state, and `_invoke_run` restarts a FAILED group while
    `_remaining_restarts > 0` (agent/server/api.py)."""
    from torch.distributed.elastic.agent.server.api import WorkerState

    def make(monitor: Callable) -> Callable:
        @functools.wraps(monitor)
        def monitor_workers(self, worker_group):  # noqa: ANN001, ANN202 (torch's signature)
            result = monitor(self, worker_group)
            if result.state == WorkerState.FAILED and final({f.exitcode for f in result.failures.values()}):
                self._remaining_restarts = 0
            return result

        return monitor_workers

    _replace(MONITOR_WORKERS, make)


def before_the_agent_stops_its_workers(hook: Callable[[signal.Signals, list[int]], None]) -> None:
    """`hook(the signal, the workers' pids)` runs as the agent is about to signal its workers and wait
    for them (`_shutdown`, local_elastic_agent.py; SimpleElasticAgent.run calls it with the signal
    that stopped the agent, or SIGTERM)."""

    def make(shutdown: Callable) -> Callable:
        @functools.wraps(shutdown)
        def shutdown_after_hook(self, death_sig=signal.SIGTERM, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if self._pcontext is not None:
                hook(signal.Signals(death_sig), list(self._pcontext.pids().values()))
            return shutdown(self, death_sig, *args, **kwargs)

        return shutdown_after_hook

    _replace(SHUTDOWN_WORKERS, make)


def on_stop_signal(remember: Callable[[signal.Signals], None]) -> None:
    """`remember(the signal)` runs in the agent's own handler for SIGTERM and SIGINT, before it raises
    SignalException wherever the main thread is (multiprocessing/api.py)."""

    def make(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def remember_then_raise(signum, frame):  # noqa: ANN001, ANN202 (a signal handler)
            remember(signal.Signals(signum))
            handler(signum, frame)

        return remember_then_raise

    _replace(STOP_SIGNAL_HANDLER, make)


def keep_the_rendezvous_open_when(stopped: Callable[[], bool]) -> None:
    """The launcher does not close the rendezvous for the other nodes while `stopped()`: torch leaves
    it open when the agent ended with a SignalException (launcher/api.py `launch_agent`)."""

    def make(close: Callable) -> Callable:
        @functools.wraps(close)
        def shutdown_unless_stopped(self):  # noqa: ANN001, ANN202 (torch's signature)
            if stopped():
                return True  # left open, as torch leaves it after a SignalException
            return close(self)

        return shutdown_unless_stopped

    _replace(CLOSE_RENDEZVOUS, make)


def create_agent_stores_with(tcp_store: Callable[..., Any]) -> None:
    """The agent creates its TCPStore servers through `tcp_store(host_name, port, **options)` (job/
    loopback.py): the c10d rendezvous store, the static one, and the store it shares with its workers.
    Each is replaced on its own, so a torch that changed one keeps the other two."""
    positional = _TCP_STORE_PARAMETERS[2:7]  # as static_tcp_rendezvous passes them

    def store(host_name, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 (TCPStore's signature)
        return tcp_store(host_name, port, **dict(zip(positional, args, strict=False)), **kwargs)

    def create_tcp_store_server(self, master_addr, master_port):  # noqa: ANN001, ANN202 (torch's signature)
        return tcp_store(master_addr, master_port, is_master=True, multi_tenant=True)

    _replace(C10D_STORE, lambda _: store)
    _replace(STATIC_STORE, lambda _: store)
    _replace(SHARED_STORE, lambda _: create_tcp_store_server)


def poll_waiting_nodes_through(poll: Callable[[object, Callable[[], int]], int]) -> None:
    """The agent's poll of the rendezvous store between looks at its workers (`num_nodes_waiting`,
    called by `_invoke_run` while the group is healthy) becomes `poll(the handler, torch's poll)`."""

    def make(count: Callable) -> Callable:
        @functools.wraps(count)
        def num_nodes_waiting(self):  # noqa: ANN001, ANN202 (torch's signature)
            return poll(self, lambda: count(self))

        return num_nodes_waiting

    _replace(NODES_WAITING, make)


def bound_rendezvous_store_calls(call: Callable[[object, float, Callable[[], Any]], Any]) -> None:
    """Each call the c10d rendezvous backend makes to its store (`_call_store`: the state's get and
    compare_set, for joining, heartbeats, polls and closing the rendezvous) becomes `call(the backend,
    the store's timeout in seconds, torch's call)`."""

    def make(call_store: Callable) -> Callable:
        @functools.wraps(call_store)
        def call_store_within(self, store_op, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            timeout_s = self._store.timeout.total_seconds()
            return call(self, timeout_s, lambda: call_store(self, store_op, *args, **kwargs))

        return call_store_within

    _replace(STORE_CALL, make)


# --- called, not replaced (the module docstring's second list) -------------------------------------

DEFAULT_STORE = ("torch.distributed.distributed_c10d", "_get_default_store")
ALLOWED_GLOBALS = ("torch._weights_only_unpickler", "_get_allowed_globals")


def default_store() -> Any:  # noqa: ANN401 (a torch.distributed.Store)
    """The default process group's store; RuntimeError where this torch has no such function (the
    error a store that does not answer raises)."""
    try:
        get = _resolve(*DEFAULT_STORE)
    except (ImportError, AttributeError):
        raise RuntimeError("this torch has no distributed_c10d._get_default_store") from None
    return get()


def weights_only_default_globals() -> set[str] | None:
    """The globals (`module.qualname`) torch's weights-only unpickler accepts by default; None where this
    torch does not say."""
    try:
        return set(_resolve(*ALLOWED_GLOBALS)())
    except (ImportError, AttributeError, TypeError):
        return None
