"""job.torch_private: each name in torch the launcher replaces is checked first; on a torch where one
is not as checked, the launcher says so in one line and leaves torch's behaviour for that part.

A changed torch is simulated the way torch would change: a name deleted (from every class that has
it), its parameters renamed, or the torch function that used it rewritten to use another name (its
code object's names replaced). In this process for every target; end to end, in a real launch of the
job, for the one whose loss a user sees at once (an exit 2 restarted as plain torchrun restarts it).
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO, clean_env, tiny_overrides

from job import torch_private
from job.errors import EXIT_BAD_INPUT
from job.loopback import tcp_store
from job.torch_private import TARGETS, Target


def install_stores() -> None:
    torch_private.create_agent_stores_with(tcp_store)


INSTALL: dict[str, Callable[[], None]] = {
    torch_private.MONITOR_WORKERS.label: lambda: torch_private.stop_restarts_when(lambda codes: True),
    torch_private.SHUTDOWN_WORKERS.label: lambda: torch_private.before_the_agent_stops_its_workers(lambda *_: None),
    torch_private.STOP_SIGNAL_HANDLER.label: lambda: torch_private.on_stop_signal(lambda sig: None),
    torch_private.CLOSE_RENDEZVOUS.label: lambda: torch_private.keep_the_rendezvous_open_when(lambda: False),
    torch_private.C10D_STORE.label: install_stores,
    torch_private.STATIC_STORE.label: install_stores,
    torch_private.SHARED_STORE.label: install_stores,
    torch_private.STORE_CALL.label: lambda: torch_private.bound_rendezvous_store_calls(lambda backend, s, ask: ask()),
    torch_private.NODES_WAITING.label: lambda: torch_private.poll_waiting_nodes_through(lambda handler, ask: ask()),
}
"""The launcher's call that replaces each target (job/launch.py `_launch`); one call replaces all three stores."""


def owner_and_attribute(module: str, dotted: str) -> tuple[object, str]:
    owner = importlib.import_module(module)
    *path, attribute = dotted.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attribute


def current(target: Target) -> object:
    owner, attribute = owner_and_attribute(target.module, target.name)
    return getattr(owner, attribute, None)


@pytest.fixture
def torch_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every target and every function that uses one as this torch has them, after the test."""
    for target in TARGETS:
        for module, dotted in ((target.module, target.name), tuple(target.looked_up_by.split(":"))):
            owner, attribute = owner_and_attribute(module, dotted)
            monkeypatch.setattr(owner, attribute, getattr(owner, attribute))


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("job.launch: ")]


def test_every_target_is_as_checked_on_this_torch() -> None:
    """The pinned torch (and 2.13.0, the module docstring's table) has every target as checked."""
    assert torch_private.changes() == {}


def test_every_target_is_in_the_module_docstrings_table() -> None:
    table = torch_private.__doc__
    for target in TARGETS:
        assert f"\n{target.label} (" in table, target.label
        assert target.label in INSTALL


def test_on_this_torch_every_target_is_replaced_without_a_warning(torch_restored: None, capsys) -> None:  # noqa: ANN001
    before = {target.label: current(target) for target in TARGETS}
    for install in dict.fromkeys(INSTALL.values()):
        install()
    assert capsys.readouterr().err == ""
    assert [t.label for t in TARGETS if current(t) is before[t.label]] == []


def delete_everywhere(monkeypatch: pytest.MonkeyPatch, target: Target) -> None:
    """torch removed the name: from its class and every class it inherits it from."""
    owner, attribute = owner_and_attribute(target.module, target.name)
    for cls in inspect.getmro(owner) if inspect.isclass(owner) else (owner,):
        if attribute in vars(cls):
            monkeypatch.delattr(cls, attribute)


def rename_parameter(monkeypatch: pytest.MonkeyPatch, target: Target) -> None:
    """torch changed the signature: its last parameter renamed (for TCPStore, a stand-in class)."""
    owner, attribute = owner_and_attribute(target.module, target.name)
    names = [*target.parameters[:-1], "renamed"]
    source = f"def {attribute}({', '.join(names)}):\n    raise AssertionError('called')\n"
    namespace: dict[str, object] = {}
    exec(source, namespace)  # noqa: S102 (a function with the given parameter names)
    monkeypatch.setattr(owner, attribute, namespace[attribute])


def rename_in(function: object, old: str, new: str) -> types.FunctionType:
    """`function` (unwrapped) as torch would write it if it used `new` where it uses `old`."""
    original = inspect.unwrap(function)
    names = tuple(new if name == old else name for name in original.__code__.co_names)
    renamed = types.FunctionType(
        original.__code__.replace(co_names=names), original.__globals__, original.__name__,
        original.__defaults__, original.__closure__,
    )  # fmt: skip
    renamed.__kwdefaults__ = original.__kwdefaults__
    return renamed


def stop_looking_it_up(monkeypatch: pytest.MonkeyPatch, target: Target) -> None:
    """torch renamed the name in the function that uses it: the replacement would never be called."""
    module, dotted = target.looked_up_by.split(":")
    owner, attribute = owner_and_attribute(module, dotted)
    monkeypatch.setattr(owner, attribute, rename_in(getattr(owner, attribute), target.attribute, "renamed"))


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.label)
@pytest.mark.parametrize(
    ("change", "found"),
    [
        (delete_everywhere, "(missing)"),
        (rename_parameter, "(parameters ("),
        (stop_looking_it_up, "(no longer used by "),
    ],
    ids=["missing", "parameter-renamed", "no-longer-looked-up"],
)
def test_a_changed_target_is_left_to_torch_with_one_warning(
    torch_restored: None, monkeypatch: pytest.MonkeyPatch, capsys, target: Target, change, found: str
) -> None:  # noqa: ANN001
    change(monkeypatch, target)
    changed = current(target)
    INSTALL[target.label]()
    warnings = [line for line in warnings_in(capsys.readouterr().err) if f" changed {target.label} (" in line]
    assert len(warnings) == 1, warnings
    if target.same_as is None or change is not rename_parameter:
        assert found in warnings[0], warnings[0]
    else:  # a stand-in for TCPStore is no longer torch.distributed.TCPStore, which is checked first
        assert "(no longer torch.distributed.TCPStore)" in warnings[0], warnings[0]
    assert warnings[0].endswith(f"; {target.lost} (plain torchrun behaviour)"), warnings[0]
    assert current(target) is changed, "the launcher replaced a target it did not recognise"


RENAMED_MONITOR = """
import runpy, sys, types
from torch.distributed.elastic.agent.server import api, local_elastic_agent

# torch renames the agent's look at its workers: the method, in the base class and the local agent,
# and the call in _invoke_run (its code's names).
for cls in (api.SimpleElasticAgent, local_elastic_agent.LocalElasticAgent):
    cls._check_workers = cls.__dict__["_monitor_workers"]
    delattr(cls, "_monitor_workers")
run = api.SimpleElasticAgent._invoke_run
names = tuple("_check_workers" if n == "_monitor_workers" else n for n in run.__code__.co_names)
run.__code__ = run.__code__.replace(co_names=names)
runpy.run_module("job.launch", run_name="__main__", alter_sys=True)
"""


@pytest.mark.processes
@pytest.mark.parametrize("torch_kind", ["as-pinned", "monitor-renamed"])
def test_where_torch_renamed_the_agents_monitor_bad_input_is_restarted_as_plain_torchrun_does(
    tiny_root: Path, tmp_path: Path, torch_kind: str
) -> None:
    """make train-local's launcher with --max-restarts 1 and no data (bad input, exit 2). As pinned:
    no warning, one round, one error line. On a torch whose agent calls its monitor by another name,
    the launcher cannot stop the restart: one warning line says so, and the group is started again as
    plain torchrun starts it (the error line twice), still ending with exit 2 and no traceback."""
    (tmp_path / "empty").mkdir()
    args = ["train", *tiny_overrides(tmp_path / "empty", tmp_path / "run")]
    torchrun = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.1"]
    if torch_kind == "as-pinned":
        start = [sys.executable, "-m", "job.launch"]
    else:
        (tmp_path / "renamed_monitor.py").write_text(RENAMED_MONITOR)
        start = [sys.executable, str(tmp_path / "renamed_monitor.py")]
    result = subprocess.run(
        [*start, *torchrun, "-m", "job", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=clean_env(PYTHONPATH=str(REPO), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),  # pytorch#135712
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_BAD_INPUT, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error: " in line and "MNIST files missing" in line]
    warnings = warnings_in(result.stderr)
    if torch_kind == "as-pinned":
        assert (warnings, len(errors)) == ([], 1), output[-3000:]
    else:
        assert len(warnings) == 1, output[-3000:]
        assert "changed LocalElasticAgent._monitor_workers (missing)" in warnings[0], warnings[0]
        assert "exit 2 (bad input) is restarted like any failure" in warnings[0], warnings[0]
        assert len(errors) == 2, output[-3000:]  # the first round and the one restart


def test_names_the_workers_call_are_checked_and_their_loss_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two private functions the job's workers call (the module docstring's second list): where
    torch lacks one, `changes` names it, the hang report's store lookup fails as a silent store does
    (RuntimeError), and job/untrusted.py falls back to its own list (None)."""
    for module, name in (torch_private.DEFAULT_STORE, torch_private.ALLOWED_GLOBALS):
        monkeypatch.delattr(importlib.import_module(module), name)
    assert torch_private.changes() == {"_get_default_store": "missing", "_get_allowed_globals": "missing"}
    with pytest.raises(RuntimeError, match="_get_default_store"):
        torch_private.default_store()
    assert torch_private.weights_only_default_globals() is None
