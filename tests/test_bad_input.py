"""Bad input, each kind: one clear line on stderr, a non-zero exit, no traceback, and the run
directory it pointed at left exactly as it was (every case aims at a finished run's directory)."""

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
    snapshot,
    tiny_overrides,
)

from job.errors import EXIT_BAD_INPUT, EXIT_FAILED
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


def _launched(world_size: int, rank: int) -> dict[str, str]:
    return clean_env(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999"
    )


MORE = "train.epochs=3"
CASES = {
    # name: (extra overrides or --config, launcher env, words the one line must hold)
    "unknown key": (["optim.lrr=0.1"], None, ["unknown config key optim.lrr", "did you mean optim.lr?"]),
    "wrong type": (["train.epochs=two"], None, ["train.epochs='two' has the wrong type: expected an integer"]),
    "out of range": (["optim.momentum=1.5"], None, ["optim.momentum=1.5 is out of range: must be in [0, 1)"]),
    "YAML syntax": (["--config", "{syntax-error}"], None, ["YAML syntax error at line 4"]),
    "missing config": (["--config", "{missing}/none.yaml"], None, ["none.yaml does not exist"]),
    "batch split": ([], _launched(3, 0), ["data.global_batch_size=64 does not split evenly across 3 ranks"]),
    # A finished run reads no data (started again it says so and stops): these continue it for an
    # epoch more, so the data is needed.
    "missing data": (["data.root={missing}", MORE], None, ["MNIST files missing under", "data.download=false"]),
    "truncated IDX": (["data.root={truncated}", MORE], None, ["train-images-idx3-ubyte is truncated"]),
    "wrong magic": (["data.root={wrong-magic}", MORE], None, ["is not an IDX file of 1-d unsigned bytes"]),
    "checksum": (["data.verify=true", MORE], None, ["checksum mismatch for", "python -m job data --root"]),
    "nccl without GPU": (["dist.backend=nccl"], None, ["dist.backend=nccl asks for GPUs but CUDA is not usable here"]),
    "RANK >= WORLD_SIZE": ([], _launched(2, 2), ["RANK=2 must be below WORLD_SIZE=2"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_the_run_directory_alone(case, finished_run, tiny_root, bad_roots):
    if case == "nccl without GPU" and torch.cuda.is_available():
        pytest.skip("checks the message for hosts without a GPU")
    extra, env, needles = CASES[case]
    extra = [arg.format(**{k: str(v) for k, v in bad_roots.items()}) for arg in extra]
    config = extra[:2] if extra[:1] == ["--config"] else []
    before = snapshot(finished_run)
    result = run_job(["train", *config, *tiny_overrides(tiny_root, finished_run), *extra[len(config) :]], env=env)
    assert_one_line_error(result, *needles)
    assert result.returncode == EXIT_BAD_INPUT
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
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000000003.pt", "step-000000006.pt"]
    assert load_weights_only(checkpoint(run_dir, 6))["global_step"] == 6

    # Space freed: the same command resumes and ends as if nothing had happened.
    again = run_job(["train", *tiny_overrides(tiny_root, run_dir, *overrides)])
    assert_ok(again)
    assert f"Resuming from {checkpoint(run_dir, 6)}" in again.stdout
    assert_ok(run_job(["train", *tiny_overrides(tiny_root, straight, *overrides)]))
    assert_same_weights(run_dir, straight)
