"""The error hierarchy: every one-line error names its exit code where it is raised."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from job import errors
from job.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED, JobError

JOB = Path(errors.__file__).parent


def error_classes() -> list[type[JobError]]:
    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, JobError)]


@pytest.mark.parametrize("cls", [c for c in error_classes() if c not in (JobError, errors.PeerFailedError)])
def test_each_error_kind_has_one_of_the_documented_exit_codes(cls):
    assert cls.exit_code in (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED)


def test_a_peer_failure_carries_the_failed_rank_code():
    assert errors.PeerFailedError("peer failed", exit_code=EXIT_FAILED).exit_code == EXIT_FAILED


def test_the_base_class_is_never_raised():
    """`raise JobError(...)` would hide the exit code (and JobError has none): raise a kind."""
    raised = []
    for path in sorted(JOB.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                if isinstance(func, ast.Name) and func.id == "JobError":
                    raised.append(f"{path.name}:{node.lineno}")
    assert not raised, raised
