"""MLflow tracking against a real `mlflow server` (SQLite store, local artifacts, 127.0.0.1, a free
port), read back with MlflowClient: one MLflow run per job, continued across a SIGKILL, a SIGTERM
stop and a server that died mid-run, with every point of metrics.jsonl there exactly once.

The data is generated: 3200 samples, 50 steps per epoch, 2 epochs, a checkpoint every 10 steps,
the loss logged at every step. Telemetry is off; nothing leaves loopback.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from helpers import (
    BIN,
    MlflowServer,
    assert_ok,
    assert_one_line_error,
    assert_same_weights,
    clean_env,
    kill_tree,
    make_tiny_mnist,
    metrics_history,
    mlflow_history,
    read_summary,
    run_job,
    snapshot,
    tiny_overrides,
)

from job.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED
from job.run_dir import RunDir
from job.tracking import config_params

STEPS_PER_EPOCH = 50
TIMED = "train/samples_per_second"  # a measured speed: its steps are the run's, its values the machine's


@pytest.fixture(scope="module")
def medium_root(tmp_path_factory):
    return make_tiny_mnist(tmp_path_factory.mktemp("medium") / "data", train=STEPS_PER_EPOCH * 64)


def train_args(root: Path, run_dir: Path, uri: str, experiment: str, *extra: str) -> list[str]:
    return [
        "train",
        *tiny_overrides(
            root, run_dir, "checkpoint.every_steps=10", "train.log_interval=1", "tracking.mlflow=true",
            f"tracking.uri={uri}", f"tracking.experiment={experiment}", *extra,
        ),
    ]  # fmt: skip


def job_env() -> dict[str, str]:
    return clean_env(MLFLOW_DISABLE_TELEMETRY="true")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=job_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def torchrun(nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m", "job"]


def only_run(client, experiment: str):  # noqa: ANN001, ANN201
    """The experiment's one MLflow run (fails when it holds none or several)."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs in {experiment}: {[r.info.run_name for r in runs]}"
    return runs[0]


def assert_mirrors(client, run, run_dir: Path) -> None:  # noqa: ANN001
    """The MLflow run holds every point of metrics.jsonl once, and the results; it is finished."""
    history = mlflow_history(client, run.info.run_id)
    assert history == metrics_history(run_dir)
    for key, points in history.items():
        steps = [step for step, _ in points]
        assert steps and len(steps) == len(set(steps)), f"{key}: a step logged twice or none: {steps}"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"model.pt", "summary.json", "config.yaml"}
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert json.loads(RunDir(run_dir).mlflow_run.read_text())["run_id"] == run.info.run_id


def assert_same_history(client, run, reference) -> None:  # noqa: ANN001
    """Same steps and values as the uninterrupted run's MLflow run (the speeds: same steps)."""
    ours, theirs = mlflow_history(client, run.info.run_id), mlflow_history(client, reference.info.run_id)
    assert [s for s, _ in ours.pop(TIMED)] == [s for s, _ in theirs.pop(TIMED)]
    assert ours == theirs


def held_until(job: subprocess.Popen, condition: Callable[[], bool], log: Path, what: str) -> list[psutil.Process]:
    """Let the job (the launcher and its workers) run in slices of 20 ms and look while it is
    stopped, until `condition()`; returns its processes, still stopped (resume_all lets them go on).
    However fast the machine, the job is then at most one slice past the moment it became true:
    it cannot finish before the test has acted."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        processes = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
        if condition():
            return processes
        if job.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{log.read_text()}")
        resume_all(processes)
        time.sleep(0.02)
    pytest.fail(f"not {what} within 240 s:\n{log.read_text()}")


def resume_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.resume()


def server_has(client, run_dir: Path, step: int) -> Callable[[], bool]:  # noqa: ANN001
    """Whether the job's MLflow run holds train/loss at `step` or later."""

    def holds() -> bool:
        if not RunDir(run_dir).mlflow_run.exists():
            return False
        run_id = json.loads(RunDir(run_dir).mlflow_run.read_text())["run_id"]
        return max((m.step for m in client.get_metric_history(run_id, "train/loss")), default=-1) >= step

    return holds


def run_id_of(run_dir: Path) -> str:
    return json.loads(RunDir(run_dir).mlflow_run.read_text())["run_id"]


@pytest.fixture(scope="module")
def spare_server(mlflow_venv, tmp_path_factory):
    """A server of their own for the tests that kill it (each starts it again before it ends)."""
    server = MlflowServer(tmp_path_factory.mktemp("spare-mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(mlflow_server, medium_root, tmp_path_factory):
    """The uninterrupted 2-rank run (torchrun), tracked in the experiment `reference`."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_job(train_args(medium_root, run_dir, mlflow_server.uri, "reference"), nproc=2, env=job_env())
    assert_ok(result)
    return run_dir, result


@pytest.mark.processes
def test_a_two_rank_run_is_one_mlflow_run_with_params_tags_metrics_and_results(mlflow_server, reference):
    run_dir, result = reference
    client = mlflow_server.client()
    run = only_run(client, "reference")
    assert_mirrors(client, run, run_dir)
    assert len(metrics_history(run_dir)["train/loss"]) == 2 * STEPS_PER_EPOCH
    assert run.info.run_name == "default"  # run.name
    params = run.data.params
    assert params["optim.lr"] == "0.05" and params["train.epochs"] == "2" and params["run.dir"] == str(run_dir)
    assert params["tracking.mlflow"] == "true" and params["data.train_limit"] == "null"
    from job.config import load_config

    assert set(params) == set(config_params(load_config()))  # every key of the resolved config
    summary = read_summary(run_dir)
    assert run.data.tags["mlflow.source.git.commit"] == summary["commit"]
    for key in ("world_size", "device", "threads_per_rank", "torch", "cpu_capability", "launcher"):
        assert run.data.tags[key] == str(summary[key]), key
    assert run.data.tags["world_size"] == "2" and run.data.tags["launcher"] == "torchrun"
    assert run.data.tags["torch"] == torch.__version__
    model = Path(client.download_artifacts(run.info.run_id, "model.pt", str(run_dir.parent / "downloaded")))
    assert model.read_bytes() == RunDir(run_dir).model.read_bytes()
    assert "Training on 2 rank(s)" in result.stdout  # two ranks trained; one MLflow run (only_run)


@pytest.mark.processes
def test_a_job_killed_mid_epoch_and_started_again_continues_its_mlflow_run(
    mlflow_server, medium_root, reference, tmp_path
):
    client, run_dir, log = mlflow_server.client(), tmp_path / "run", tmp_path / "log"
    args = train_args(medium_root, run_dir, mlflow_server.uri, "killed")
    job = start([*torchrun(2), *args], log)
    held_until(job, server_has(client, run_dir, 20), log, "the server had step 20")
    run_id = run_id_of(run_dir)
    kill_tree(job.pid)  # the node is gone: launcher and workers at once (held mid-run)
    job.wait()
    sent = max(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert sent < 2 * STEPS_PER_EPOCH, "killed before the end"

    again = run_job(args, nproc=2, env=job_env())
    assert_ok(again)
    assert "Resuming from" in again.stdout + again.stderr
    run = only_run(client, "killed")
    assert run.info.run_id == run_id
    assert_mirrors(client, run, run_dir)
    assert_same_history(client, run, only_run(client, "reference"))
    assert_same_weights(run_dir, reference[0])


@pytest.mark.processes
def test_a_job_stopped_by_sigterm_and_started_again_continues_its_mlflow_run(
    mlflow_server, medium_root, reference, tmp_path
):
    client, run_dir, log = mlflow_server.client(), tmp_path / "run", tmp_path / "log"
    args = train_args(medium_root, run_dir, mlflow_server.uri, "stopped")
    launch = [sys.executable, "-m", "job.launch", "--standalone", "--nproc-per-node", "2", "-m", "job"]
    job = start([*launch, *args], log)
    resume_all(held_until(job, server_has(client, run_dir, 20), log, "the server had step 20"))
    run_id = run_id_of(run_dir)
    job.send_signal(signal.SIGTERM)  # the ranks stop at their next vote, within 10 steps
    assert job.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()
    assert client.get_run(run_id).info.status == "RUNNING"  # stopped, not finished

    again = subprocess.run([*launch, *args], env=job_env(), capture_output=True, text=True, timeout=300)
    assert_ok(again)
    run = only_run(client, "stopped")
    assert run.info.run_id == run_id
    assert_mirrors(client, run, run_dir)
    assert_same_history(client, run, only_run(client, "reference"))


@pytest.mark.processes
def test_a_server_killed_mid_run_and_restarted_gets_every_point_once(spare_server, medium_root, tmp_path):
    server = spare_server.start()
    try:
        client, run_dir, log = server.client(), tmp_path / "run", tmp_path / "log"
        job = start([sys.executable, "-m", "job", *train_args(medium_root, run_dir, server.uri, "server-killed")], log)
        held = held_until(job, server_has(client, run_dir, 20), log, "the server had step 20")
        server.stop(signal.SIGKILL)
        resume_all(held)
        # Held again once a checkpoint found the server gone (training went on), while it starts again.
        held = held_until(job, lambda: "does not answer" in log.read_text(), log, "the job saw the server gone")
        try:
            server.start()
        finally:
            resume_all(held)
        assert job.wait(timeout=300) == 0, log.read_text()
        output = log.read_text()
        assert output.count("does not answer") == 1, output  # one warning, not one per checkpoint
        assert "answers again" in output and "did not take" not in output, output
        assert_mirrors(client, only_run(client, "server-killed"), run_dir)
    finally:
        server.stop()  # killed again, so a failure here leaves no half-started server behind


@pytest.mark.processes
def test_what_the_end_could_not_send_is_said_and_sent_by_the_next_start(spare_server, medium_root, tmp_path):
    server = spare_server.start()
    try:
        client, run_dir, log = server.client(), tmp_path / "run", tmp_path / "log"
        args = train_args(medium_root, run_dir, server.uri, "end-unsent")
        job = start([sys.executable, "-m", "job", *args], log)
        held = held_until(job, server_has(client, run_dir, 20), log, "the server had step 20")
        server.stop(signal.SIGKILL)
        resume_all(held)
        assert job.wait(timeout=300) == 0, log.read_text()  # the run finishes without its server
        unsent = [line for line in log.read_text().splitlines() if "did not take" in line]
        assert len(unsent) == 1 and "run the same command again" in unsent[0], log.read_text()

        server.start()
        again = run_job(args, env=job_env())
        assert_ok(again)
        assert "nothing to do" in again.stdout + again.stderr
        assert_mirrors(client, only_run(client, "end-unsent"), run_dir)
    finally:
        server.stop()


@pytest.mark.processes
def test_each_run_name_is_its_own_mlflow_run_and_a_finished_one_started_again_opens_none(
    mlflow_server, medium_root, tmp_path
):
    client = mlflow_server.client()
    short = ("train.epochs=1", "data.train_limit=640")
    runs = {name: tmp_path / name for name in ("first", "second")}
    for name, run_dir in runs.items():
        args = train_args(medium_root, run_dir, mlflow_server.uri, "names", f"run.name={name}", *short)
        assert_ok(run_job(args, env=job_env()))
    assert_ok(run_job(train_args(medium_root, runs["first"], mlflow_server.uri, "names", "run.name=first", *short),
                      env=job_env()))  # fmt: skip
    found = client.search_runs([client.get_experiment_by_name("names").experiment_id])
    assert sorted(run.info.run_name for run in found) == ["first", "second"]
    for run in found:
        assert_mirrors(client, run, runs[run.info.run_name])


@pytest.mark.processes
@pytest.mark.parametrize("case", ["closed port", "unknown scheme", "no uri"])
def test_a_server_that_cannot_be_used_at_start_is_exit_2_before_anything_is_written(
    mlflow_server, medium_root, tmp_path, case
):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    uri = {"closed port": f"http://127.0.0.1:{closed}", "unknown scheme": "htp://127.0.0.1:5000", "no uri": "null"}
    run_dir = tmp_path / "run"
    env = {k: v for k, v in job_env().items() if k != "MLFLOW_TRACKING_URI"}
    result = run_job(train_args(medium_root, run_dir, uri[case], "bad-uri"), env=env, timeout=300)
    assert result.returncode == EXIT_BAD_INPUT
    assert_one_line_error(result, "tracking.uri" if case != "no uri" else "tracking.mlflow=true")
    assert not run_dir.exists()


@pytest.mark.processes
def test_a_run_directory_whose_mlflow_run_the_server_lacks_is_exit_2_and_left_as_it_was(
    mlflow_server, medium_root, tmp_path
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunDir(run_dir).mlflow_run.write_text(json.dumps({"run_id": "0" * 32}))
    before = snapshot(run_dir)
    result = run_job(train_args(medium_root, run_dir, mlflow_server.uri, "lacks"), env=job_env(), timeout=300)
    assert result.returncode == EXIT_BAD_INPUT
    assert_one_line_error(result, "0" * 32, "does not hold", "mlflow_run.json")
    assert snapshot(run_dir) == before


@pytest.mark.processes
def test_a_symlinked_mlflow_run_file_is_refused_before_anything_is_read_or_written(
    mlflow_server, medium_root, tmp_path
):
    """mlflow_run.json is one of the run directory's entries (RunDir.written): a link planted there,
    to another run directory's id, would mirror this run into that MLflow run."""
    run_dir, outside = tmp_path / "run", tmp_path / "outside.json"
    run_dir.mkdir()
    outside.write_text(json.dumps({"run_id": "0" * 32}))
    RunDir(run_dir).mlflow_run.symlink_to(outside)
    result = run_job(train_args(medium_root, run_dir, mlflow_server.uri, "symlinked"), env=job_env(), timeout=300)
    assert result.returncode == EXIT_BAD_INPUT
    assert_one_line_error(result, f"{RunDir(run_dir).mlflow_run} is a symbolic link")
    assert sorted(p.name for p in run_dir.iterdir()) == ["mlflow_run.json"]
    assert mlflow_server.client().get_experiment_by_name("symlinked") is None  # the server was not asked


@pytest.mark.processes
def test_the_job_runs_without_the_mlflow_client_unless_tracking_is_on(medium_root, tmp_path):
    """mlflow is imported only when tracking.mlflow=true; without it installed, that is one line, exit 2."""
    blocker = tmp_path / "site"
    (blocker / "mlflow").mkdir(parents=True)
    (blocker / "mlflow" / "__init__.py").write_text("raise ImportError('no mlflow here')\n")
    env = job_env()
    env["PYTHONPATH"] = f"{blocker}:{env.get('PYTHONPATH', '')}"
    off = tiny_overrides(medium_root, tmp_path / "off", "train.epochs=1", "data.train_limit=640")
    assert_ok(run_job(["train", *off], env=env))
    on = run_job(["train", *off, "tracking.mlflow=true", "tracking.uri=http://127.0.0.1:1"], env=env, timeout=300)
    assert on.returncode == EXIT_BAD_INPUT
    assert_one_line_error(on, "mlflow-skinny", "--require-hashes -r requirements.lock")
