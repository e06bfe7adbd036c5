"""Bad input, each kind: one clear line on stderr, a non-zero exit, no traceback, and the run
directory it pointed at left exactly as it was (every case aims at a finished run's directory).

What the job finds before a process group starts (config, launcher environment, device) is read
from `main()` called in this process (helpers.run_main); what a rank finds in a process group
(data, the run directory, a full disk) from a real `python -m job`, and the batch that does not
split from three real ranks under torchrun."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import (
    REPO,
    assert_ok,
    assert_one_line_error,
    assert_same_weights,
    checkpoint,
    clean_env,
    run_job,
    run_main,
    snapshot,
    tiny_overrides,
)

from job.errors import EXIT_BAD_INPUT, EXIT_FAILED
from job.run_dir import RunDir
from job.untrusted import load_weights_only

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def finished_run(tiny_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert_ok(run_job(["train", *tiny_overrides(tiny_root, run_dir, "checkpoint.every_steps=3")]))
    return run_dir


@pytest.fixture(scope="module")
def bad_roots(tiny_root, tmp_path_factory):
    """Data roots with one thing wrong each."""
    base = tmp_path_factory.mktemp("bad-data")
    roots = {"missing": base / "missing"}
    roots["missing"].mkdir()
    for name in ("truncated", "wrong-magic"):
        roots[name] = base / name
        shutil.copytree(tiny_root, roots[name])
    images = roots["truncated"] / "MNIST/raw/train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    labels = roots["wrong-magic"] / "MNIST/raw/t10k-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])
    roots["syntax-error"] = base / "bad.yaml"
    roots["syntax-error"].write_text("seed: 1\ndata:\n  root: [data\n")
    return roots


def _launched(world_size: int, rank: int, **more: str) -> dict[str, str]:
    return clean_env(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999",
        **more,
    )  # fmt: skip


def _train_args(extra: list[str], finished_run, tiny_root, bad_roots) -> list[str]:
    """`train` aimed at the finished run, with a case's overrides or --config (bad_roots' names filled in)."""
    extra = [arg.format(**{k: str(v) for k, v in bad_roots.items()}) for arg in extra]
    config = extra[:2] if extra[:1] == ["--config"] else []
    return ["train", *config, *tiny_overrides(tiny_root, finished_run), *extra[len(config) :]]


# Found before a process group starts: main() is called in this process (helpers.run_main).
BEFORE_THE_GROUP = {
    # name: (extra overrides or --config, launcher env, words the one line must hold)
    "unknown key": (["optim.lrr=0.1"], None, ["unknown config key optim.lrr", "did you mean optim.lr?"]),
    "wrong type": (["train.epochs=two"], None, ["train.epochs='two' has the wrong type: expected an integer"]),
    "out of range": (["optim.momentum=1.5"], None, ["optim.momentum=1.5 is out of range: must be in [0, 1)"]),
    "YAML syntax": (["--config", "{syntax-error}"], None, ["YAML syntax error at line 4"]),
    "missing config": (["--config", "{missing}/none.yaml"], None, ["none.yaml does not exist"]),
    "nccl without GPU": (["dist.backend=nccl"], None, ["dist.backend=nccl asks for GPUs but CUDA is not usable here"]),
    # The launcher's environment, each way it can contradict itself.
    "RANK >= WORLD_SIZE": ([], _launched(2, 2), ["RANK=2 must be below WORLD_SIZE=2"]),
    "WORLD_SIZE not a number": ([], clean_env(RANK="0", WORLD_SIZE="two"), ["WORLD_SIZE='two' is not an integer"]),
    "LOCAL_RANK missing": ([], clean_env(RANK="0", WORLD_SIZE="2"), ["LOCAL_RANK is not set"]),
    "MASTER_ADDR missing": (
        [], clean_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"), ["MASTER_ADDR is not set for a 2-process job"]
    ),
    "LOCAL_RANK >= LOCAL_WORLD_SIZE": (
        [], clean_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="2"), ["LOCAL_RANK=2 must be below LOCAL_WORLD_SIZE=2"]
    ),
    "LOCAL_WORLD_SIZE > WORLD_SIZE": (
        [], _launched(2, 0, LOCAL_WORLD_SIZE="4"), ["LOCAL_WORLD_SIZE=4 exceeds WORLD_SIZE=2", "not nodes"]
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BEFORE_THE_GROUP)
def test_bad_input_is_one_line_and_leaves_the_run_directory_alone(
    case, finished_run, tiny_root, bad_roots, tmp_path, capfd
):
    if case == "nccl without GPU" and torch.cuda.is_available():
        pytest.skip("checks the message for hosts without a GPU")
    extra, env, needles = BEFORE_THE_GROUP[case]
    before = snapshot(finished_run)
    result = run_main(capfd, _train_args(extra, finished_run, tiny_root, bad_roots), env=env, cwd=tmp_path)
    assert_one_line_error(result, *needles)
    assert result.returncode == EXIT_BAD_INPUT
    assert snapshot(finished_run) == before
    assert list(tmp_path.iterdir()) == [], "nothing written anywhere else either"


# Found by a rank in a process group: a real `python -m job` each (helpers.run_job). A finished run
# reads no data (started again it says so and stops): these continue it for an epoch more.
MORE = "train.epochs=3"
WITH_THE_GROUP = {
    "missing data": (["data.root={missing}", MORE], ["MNIST files missing under", "data.download=false"]),
    "truncated IDX": (["data.root={truncated}", MORE], ["train-images-idx3-ubyte is truncated"]),
    "wrong magic": (["data.root={wrong-magic}", MORE], ["is not an IDX file of 1-d unsigned bytes"]),
    "checksum": (["data.verify=true", MORE], ["checksum mismatch for", "python -m job data --root"]),
}


@pytest.mark.parametrize("case", WITH_THE_GROUP)
def test_bad_data_is_one_line_and_leaves_the_run_directory_alone(case, finished_run, tiny_root, bad_roots):
    extra, needles = WITH_THE_GROUP[case]
    before = snapshot(finished_run)
    result = run_job(_train_args(extra, finished_run, tiny_root, bad_roots))
    assert_one_line_error(result, *needles)
    assert result.returncode == EXIT_BAD_INPUT
    assert snapshot(finished_run) == before


def test_a_batch_that_does_not_split_is_one_line_per_job_and_leaves_the_run_directory_alone(finished_run, tiny_root):
    """Three real ranks under torchrun: every rank finds it, the first process of the host says it,
    once (the others wait for it to exit: job/__main__.py, _wait_for_the_rank_that_says_it)."""
    before = snapshot(finished_run)
    result = run_job(["train", *tiny_overrides(tiny_root, finished_run)], nproc=3)
    errors = [line for line in result.stderr.splitlines() if " error: " in line]
    assert errors == [
        "[rank 0] error: data.global_batch_size=64 does not split evenly across 3 ranks; "
        "use a multiple of 3 (e.g. 63 or 66) or another number of processes"
    ], result.stderr  # plain torchrun adds its own ChildFailedError report: job.launch's tests pin the rest
    assert snapshot(finished_run) == before


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory the job cannot write: a read-only mount for root (who ignores modes), else mode 555."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {mount.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_an_unwritable_run_directory_is_one_line(tiny_root, read_only_dir):
    run_dir = read_only_dir / "run"
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir)])
    reason = os.strerror(errno.EROFS if os.geteuid() == 0 else errno.EACCES)
    assert_one_line_error(result, f"cannot write run directory {run_dir} ({reason}); set run.dir to a writable path")
    assert not any(read_only_dir.iterdir())


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_ones(tiny_root, tmp_path):
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    overrides = ("checkpoint.every_steps=3", "checkpoint.keep=100")
    probe = [sys.executable, str(REPO / "tests/probes/disk_full.py"), "3"]  # steps 3, 6 written; 8 fails
    result = subprocess.run(
        [*probe, "train", *tiny_overrides(tiny_root, run_dir, *overrides)],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = assert_one_line_error(result, f"cannot write checkpoint {checkpoint(run_dir, 8)} (No space left on device)")
    assert "the previous checkpoints are intact" in line
    assert result.returncode == EXIT_FAILED
    assert sorted(p.name for p in RunDir(run_dir).checkpoints.path.iterdir()) == [
        "step-000000003.pt",
        "step-000000006.pt",
    ]
    assert load_weights_only(checkpoint(run_dir, 6))["global_step"] == 6

    # Space freed: the same command resumes and ends as if nothing had happened.
    again = run_job(["train", *tiny_overrides(tiny_root, run_dir, *overrides)])
    assert_ok(again)
    assert f"Resuming from {checkpoint(run_dir, 6)}" in again.stdout
    assert_ok(run_job(["train", *tiny_overrides(tiny_root, straight, *overrides)]))
    assert_same_weights(run_dir, straight)
