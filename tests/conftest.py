"""Fixtures only; the helpers they use, and the tests use, are in helpers.py; the finished runs
they share, trained once per session, are defined in reference_runs.py."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import reference_runs
from helpers import BIN, REPO, MlflowServer, make_tiny_mnist
from reference_runs import FinishedRun


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated MNIST-layout dataset: 512 training and 203 test samples."""
    return make_tiny_mnist(tmp_path_factory.mktemp("tiny") / "data")


# --- finished runs shared by the tests that only read them (reference_runs.py) ----------------
# Each is trained once per session by the first test that asks for it (a `processes` test); the
# function-scoped fixture a test takes checks after the test that it left the run as it was.


@pytest.fixture(scope="session")
def _one_process_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    return reference_runs.train(tiny_root, tmp_path_factory.mktemp("one-process"), *reference_runs.ONE_PROCESS)


@pytest.fixture(scope="session")
def _two_rank_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    return reference_runs.train(tiny_root, tmp_path_factory.mktemp("two-ranks"), *reference_runs.TWO_RANKS)


@pytest.fixture(scope="session")
def _two_rank_checkpointed_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    base = tmp_path_factory.mktemp("two-ranks-checkpointed")
    return reference_runs.train(tiny_root, base, *reference_runs.TWO_RANKS_CHECKPOINTED)


@pytest.fixture
def one_process_run(_one_process_run: FinishedRun, request: pytest.FixtureRequest) -> Iterator[FinishedRun]:
    """reference_runs.ONE_PROCESS, finished: read it, or copy it to change it."""
    yield _one_process_run
    _one_process_run.assert_untouched(request.node.nodeid)


@pytest.fixture
def two_rank_run(_two_rank_run: FinishedRun, request: pytest.FixtureRequest) -> Iterator[FinishedRun]:
    """reference_runs.TWO_RANKS, finished: read it, or copy it to change it."""
    yield _two_rank_run
    _two_rank_run.assert_untouched(request.node.nodeid)


@pytest.fixture
def two_rank_checkpointed_run(
    _two_rank_checkpointed_run: FinishedRun, request: pytest.FixtureRequest
) -> Iterator[FinishedRun]:
    """reference_runs.TWO_RANKS_CHECKPOINTED, finished: read it, or copy it to change it."""
    yield _two_rank_checkpointed_run
    _two_rank_checkpointed_run.assert_untouched(request.node.nodeid)


def _made(target: str) -> None:
    """`make TARGET` (nothing to do when it is up to date): the tool virtualenvs are built when a
    test that needs one is selected, not by every `make test` or `make test-fast`. One make at a
    time per repository: make test's worker processes (pytest-xdist) would otherwise build the
    same virtualenv at once, each into the other's half-made one."""
    with open(REPO / "Makefile") as makefile:  # any file of the repository serves as the lock
        fcntl.flock(makefile, fcntl.LOCK_EX)
        result = subprocess.run(["make", "--no-print-directory", target], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"make {target} failed:\n{result.stdout}{result.stderr}", pytrace=False)


@pytest.fixture(scope="session")
def k8s_venv() -> None:
    """helpers.K8S_BIN: kubectl with kustomize, kubernetes-validate, the Kubeflow models."""
    _made(".venv-k8s/.installed")


@pytest.fixture(scope="session")
def lint_venv() -> None:
    """helpers.LINT_BIN: checkov."""
    _made(".venv-lint/.installed")


@pytest.fixture(scope="session")
def mlflow_venv() -> None:
    """helpers.MLFLOW_BIN: the MLflow server (the full mlflow; the job has only the client)."""
    _made(".venv-mlflow/.installed")


@pytest.fixture(scope="session")
def mlflow_server(mlflow_venv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow server on 127.0.0.1 for the session's tests (each uses its own experiment), stopped
    after them. The tests' own client reports no telemetry either."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _processes_are_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts the job's Python (the job, a launcher, a probe, a tool) must carry the
    `processes` marker, or `make test-fast` would run it: unmarked, such a start fails the test."""
    if request.node.get_closest_marker("processes"):
        return
    popen_init = subprocess.Popen.__init__

    def guarded_init(self: subprocess.Popen, args, *rest, **kwargs) -> None:  # noqa: ANN001
        program = str(args[0] if isinstance(args, list | tuple) else args).split()[0]
        if Path(program).parent == BIN:
            raise AssertionError(f"{request.node.nodeid} starts {program}: mark it @pytest.mark.processes")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
