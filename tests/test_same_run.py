"""The same run on every node (issue 21, case 1; job/same_run.py): a node started with another
config value, other code or another torch stops the whole job at start with exit 2 and one line
naming the key and the ranks, before any step and before the run directory is written.

The nodes are two `python -m job.launch` processes meeting at a c10d rendezvous, as two hosts
do (one process each); each gets its own overrides, code or environment.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, clean_env, tiny_overrides, write_random_model

from job.config import load_config
from job.run_dir import RunDir
from job.same_run import PER_HOST_KEYS, code_digests, disagreement, run_identity

ENVIRONMENT = {"world_size": 2, "device": "cpu", "threads_per_rank": 1, "torch": "2.14.1"}


# --- the comparison, in this process ------------------------------------------------------------


def test_one_differing_override_is_named_with_its_ranks() -> None:
    ours = run_identity(load_config(overrides=["optim.lr=0.01"]), ENVIRONMENT)
    theirs = run_identity(load_config(overrides=["optim.lr=0.02"]), ENVIRONMENT)
    assert disagreement([ours, ours]) is None
    assert disagreement([ours, theirs]) == (
        "ranks disagree on the run: optim.lr is 0.01 on rank 0 but 0.02 on rank 1; start every node with the same "
        "config, code and torch, on the same kind of device and threads per rank (OMP_NUM_THREADS or CPU limit)"
    )


def test_many_ranks_are_grouped_and_at_most_three_keys_named() -> None:
    base = run_identity(load_config(), ENVIRONMENT)
    odd = {**base, "seed": 7, "torch": "2.13.0", "threads_per_rank": 2}
    line = disagreement([base, base, base, odd, base])
    assert "seed is 1 on ranks 0-2, 4 but 7 on rank 3" in line
    assert "torch is '2.14.1' on ranks 0-2, 4 but '2.13.0' on rank 3" in line
    assert "threads_per_rank is 1 on ranks 0-2, 4 but 2 on rank 3" in line
    odd["optim.momentum"] = 0.9
    assert "; and 1 more key(s)" in disagreement([base, odd])


def test_a_source_file_one_rank_lacks_is_named() -> None:
    base = run_identity(load_config(), ENVIRONMENT)
    extra = {**base, "code job/extra.py": "0123456789ab"}
    assert "code job/extra.py is absent on rank 0 but '0123456789ab' on rank 1" in disagreement([base, extra])


def test_paths_may_differ_per_host_and_nothing_else_may() -> None:
    """data.root, run.dir and train.resume name places on each host (or are read by rank 0 only);
    every other key changes the run."""
    here = run_identity(load_config(overrides=["data.root=/mnt/a", "run.dir=/runs/a", "train.resume=auto"]), {})
    there = run_identity(load_config(overrides=["data.root=/data", "run.dir=~/runs/a", "train.resume=/x.pt"]), {})
    assert disagreement([here, there]) is None
    assert set(PER_HOST_KEYS) == {"data.root", "run.dir", "train.resume"}
    assert {"seed", "optim.lr", "train.epochs", "run.name", "dist.timeout_s", "speed.compile"} <= set(here)


def test_one_changed_constant_changes_the_code_digest(tmp_path: Path) -> None:
    copy = tmp_path / "job"
    shutil.copytree(REPO / "job", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_digests(copy) == code_digests()
    edit_constant(copy)
    changed = {k for k, v in code_digests(copy).items() if code_digests()[k] != v}
    assert changed == {"code job/preemption.py"}


def edit_constant(package: Path) -> None:
    """The job package at `package` with one constant changed: the ranks' stop votes then fall on
    other steps, so their collectives no longer pair up (pytorch#174917's shape: a 30 s hang)."""
    path = package / "preemption.py"
    text = path.read_text()
    assert "STOP_VOTE_EVERY_STEPS = 10\n" in text
    path.write_text(text.replace("STOP_VOTE_EVERY_STEPS = 10\n", "STOP_VOTE_EVERY_STEPS = 3\n"))


# --- two nodes meeting at a rendezvous -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(
    root: Path,
    run_dir: Path,
    node_args: tuple[list[str], list[str]],
    node_env: tuple[dict, dict] = ({}, {}),
    node_checkout: tuple[Path, Path] = (REPO, REPO),
    command: tuple[str, ...] = ("train",),
) -> list[subprocess.CompletedProcess[str]]:
    """Two launchers, one process each, meeting at a c10d rendezvous on this host (node 0 hosts
    it), with `--max-restarts 3`, running `python -m job COMMAND`: each node's extra overrides,
    environment and checkout (the directory it starts in, whose job/ `python -m` imports first)."""
    port = free_port()
    processes = []
    for node, (extra, env, checkout) in enumerate(zip(node_args, node_env, node_checkout, strict=True)):
        cmd = [
            sys.executable, "-m", "job.launch", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "same-run",
            "--rdzv-conf", f"is_host={1 - node}", "--max-restarts", "3",
            "-m", "job", *command, *tiny_overrides(root, run_dir, "dist.timeout_s=60", *extra),
        ]  # fmt: skip
        environ = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **env)
        processes.append(
            subprocess.Popen(cmd, cwd=checkout, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def assert_stopped_at_start(
    results: list[subprocess.CompletedProcess[str]], run_dir: Path
) -> tuple[str, dict[int, int]]:
    """Both nodes exit 2, each with one error line (a restarted group would print it again) and no
    traceback, and nothing was written. Returns the line and node -> the rank the rendezvous gave
    it (ranks go in arrival order: which node became rank 0 is read from the lines)."""
    ranks, lines = {}, set()
    for node, result in enumerate(results):
        output = result.stdout + result.stderr
        assert result.returncode == 2, f"node {node}: exit {result.returncode}\n{output}"
        errors = [line for line in result.stderr.splitlines() if "error: " in line]
        assert len(errors) == 1, output
        assert "Traceback" not in output, output
        ranks[node] = int(re.match(r"\[rank (\d)\] error: ", errors[0]).group(1))
        lines.add(errors[0].split("error: ", 1)[1])
    assert sorted(ranks.values()) == [0, 1]
    assert len(lines) == 1, f"every rank says the same: {lines}"
    assert not run_dir.exists(), "nothing written before the check"
    return lines.pop(), ranks


@pytest.mark.processes
def test_a_node_with_another_learning_rate_stops_the_job(tiny_root: Path, tmp_path: Path) -> None:
    """pytorch#108212: rank 1 with one override more, optim.lr=0.02. Before: exit 0, the ranks'
    weights 0.04 apart, test accuracy 0.655 against 1.0."""
    run_dir = tmp_path / "run"
    results = two_nodes(tiny_root, run_dir, (["optim.lr=0.01"], ["optim.lr=0.01", "optim.lr=0.02"]))
    line, ranks = assert_stopped_at_start(results, run_dir)
    lr = {ranks[0]: "0.01", ranks[1]: "0.02"}
    assert line.startswith(f"ranks disagree on the run: optim.lr is {lr[0]} on rank 0 but {lr[1]} on rank 1; "), line
    assert "start every node with the same config, code and torch" in line


@pytest.mark.processes
@pytest.mark.parametrize(
    ("override", "key", "values"),
    [("seed=7", "seed", ("1", "7")), ("train.epochs=3", "train.epochs", ("2", "3"))],
    ids=["seed", "epochs"],
)
def test_a_node_with_another_seed_or_length_stops_the_job(tiny_root, tmp_path, override, key, values) -> None:
    """seed=7 on one node: before, exit 0 with overlapping shards; train.epochs=3: before, gloo's
    "Received data size doesn't match", SIGABRT, exit 1, retried."""
    run_dir = tmp_path / "run"
    line, ranks = assert_stopped_at_start(two_nodes(tiny_root, run_dir, ([], [override])), run_dir)
    value = {ranks[0]: values[0], ranks[1]: values[1]}
    assert f"{key} is {value[0]} on rank 0 but {value[1]} on rank 1" in line, line


@pytest.mark.processes
def test_a_node_running_code_where_one_constant_differs_stops_the_job(tiny_root, tmp_path) -> None:
    """pytorch#174917: one node runs from another checkout, a copy of the job package with one
    constant changed. Before: a 30 s hang, "a peer rank stopped answering", exit 1, retried."""
    copy = tmp_path / "other-code"
    shutil.copytree(REPO / "job", copy / "job", ignore=shutil.ignore_patterns("__pycache__"))
    edit_constant(copy / "job")
    run_dir = tmp_path / "run"
    results = two_nodes(tiny_root, run_dir, ([], []), ({}, {"PYTHONPATH": str(copy)}), (REPO, copy))
    line, ranks = assert_stopped_at_start(results, run_dir)
    assert re.search(r"code job/preemption\.py is '[0-9a-f]{12}' on rank 0 but '[0-9a-f]{12}' on rank 1", line), line
    assert line.count(" is ") == 1, f"only that file differs: {line}"


@pytest.mark.processes
def test_evaluate_on_nodes_running_other_code_stops_too(tiny_root, tmp_path) -> None:
    """The other multi-rank command: `evaluate` at two ranks checks the same way."""
    model = RunDir(write_random_model(tmp_path, seed=0)).model
    copy = tmp_path / "other-code"
    shutil.copytree(REPO / "job", copy / "job", ignore=shutil.ignore_patterns("__pycache__"))
    edit_constant(copy / "job")
    run_dir = tmp_path / "run"
    command = ("evaluate", "--checkpoint", str(model))
    results = two_nodes(tiny_root, run_dir, ([], []), ({}, {"PYTHONPATH": str(copy)}), (REPO, copy), command)
    line, _ = assert_stopped_at_start(results, run_dir)
    assert line.startswith("ranks disagree on the run: code job/preemption.py is "), line
    assert not any(result.stdout.strip() for result in results), "no figures printed"


@pytest.mark.processes
def test_a_node_with_another_torch_stops_the_job(tiny_root, tmp_path) -> None:
    """Another torch on one node, stood in for by a sitecustomize that makes torch report 2.13.0
    (a real second torch is a 1 GB install): the same code, another version in the identity."""
    other = tmp_path / "older-torch"
    other.mkdir()
    (other / "sitecustomize.py").write_text('import torch\n\ntorch.__version__ = "2.13.0"\n')
    run_dir = tmp_path / "run"
    results = two_nodes(tiny_root, run_dir, ([], []), ({}, {"PYTHONPATH": f"{other}:{REPO}"}))
    line, ranks = assert_stopped_at_start(results, run_dir)
    import torch

    version = {ranks[0]: str(torch.__version__), ranks[1]: "2.13.0"}
    assert f"torch is '{version[0]}' on rank 0 but '{version[1]}' on rank 1" in line, line


@pytest.mark.processes
def test_nodes_that_agree_train(tiny_root, tmp_path) -> None:
    """The check lets an equal pair through, also with per-host paths (data.root) that differ."""
    alias = tmp_path / "data-elsewhere"
    alias.symlink_to(tiny_root)
    run_dir = tmp_path / "run"
    results = two_nodes(tiny_root, run_dir, (["train.epochs=1"], ["train.epochs=1", f"data.root={alias}"]))
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
    assert RunDir(run_dir).summary.is_file()
