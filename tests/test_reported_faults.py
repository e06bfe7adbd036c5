"""Faults people report with jobs like this one, replayed: each case with the value it must give.

Each case stands for a kind (the docstrings say which); the unit tests beside it cover the
kind's other members.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, assert_ok, assert_one_line_error, clean_env, run_job, tiny_overrides, write_idx
from PIL import Image

from job import data
from job.errors import DataError
from job.model import Net
from job.run_dir import RunDir

# --- 1. data the header check passes but the net cannot take --------------------------------


def write_split(root: Path, prefix: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    raw = data.raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
    write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def own_data(root: Path, train: int = 640, test: int = 100, size: int = 28) -> Path:
    """The report's data: random images and labels 0..9, as a user's own IDX files."""
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", train), ("t10k", test)):
        write_split(
            root, prefix, torch.randint(0, 256, (n, size, size), generator=g), torch.randint(0, 10, (n,), generator=g)
        )
    return root


@pytest.mark.processes
def test_a_label_out_of_range_is_one_line_naming_file_index_and_value_with_no_run_dir(tmp_path):
    root = own_data(tmp_path / "data")
    labels = data.read_idx(data.raw_dir(root) / "train-labels-idx1-ubyte", ndim=1).clone()
    labels[-1] = 10
    write_idx(data.raw_dir(root) / "train-labels-idx1-ubyte", labels)
    run_dir = tmp_path / "run"
    overrides = [f"data.root={root}", "data.verify=false", "data.download=false", f"run.dir={run_dir}"]
    result = run_job(["train", *overrides], nproc=2, launcher="job.launch")
    assert result.returncode == 2, result.stderr
    line = assert_one_line_error(result, "train-labels-idx1-ubyte", "label 10 at index 639", "not a digit 0-9")
    assert "fix the labels" in line
    assert not run_dir.exists(), "bad data must not leave a run directory behind"


def test_every_assumption_of_the_net_and_the_loss_is_checked_at_load(tmp_path):
    """The kind's other members: image size, image/label counts, an empty split, the test split's labels."""
    with pytest.raises(DataError, match=r"holds 27x27-pixel images; the net takes 28x28"):
        data.load_split(own_data(tmp_path / "small", size=27), "train")
    root = own_data(tmp_path / "counts")
    write_split(root, "t10k", torch.zeros(100, 28, 28), torch.zeros(99))
    with pytest.raises(DataError, match=r"holds 100 images but .*t10k-labels-idx1-ubyte 99 labels"):
        data.load_split(root, "test")
    with pytest.raises(DataError, match=r"holds no samples; it needs at least one"):
        data.load_split(own_data(tmp_path / "empty", train=0), "train")
    root = own_data(tmp_path / "test-labels")
    write_split(root, "t10k", torch.zeros(5, 28, 28), torch.tensor([0, 1, 2, 255, 3]))
    with pytest.raises(DataError, match=r"label 255 at index 3 is not a digit 0-9"):
        data.load_split(root, "test")
    assert len(data.load_split(own_data(tmp_path / "fine"), "train")) == 640


# --- 2. an intact checkpoint that is not weights-only -----------------------------------------


class _RunsCode:
    """Unpickling this would run a shell command: the marker file proves it never happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def foreign_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    """Checkpoints other scripts write, each with what the one-line error must say about it."""
    weights = Net().state_dict()
    files: dict[str, tuple[Path, str]] = {}

    def save(name: str, obj: object, needle: str) -> None:
        path = folder / f"{name}.pt"
        torch.save(obj, path)
        files[name] = (path, needle)

    save("numpy-scalar", {"model": weights, "best_acc": np.float64(0.97)}, "holds numpy._core.multiarray.scalar")
    save("namespace", {"model": weights, "args": argparse.Namespace(lr=0.01)}, "holds argparse.Namespace")
    save("runs-code", {"model": weights, "x": _RunsCode(folder / "pwned")}, "holds posix.system")
    whole = (folder / "numpy-scalar.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    files["truncated"] = (folder / "truncated.pt", "truncated or corrupt")
    (folder / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    files["random"] = (folder / "random.pt", "truncated or corrupt")
    return files


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return foreign_checkpoints(tmp_path_factory.mktemp("foreign"))


def digit_png(folder: Path) -> Path:
    path = folder / "digit.png"
    Image.fromarray(np.pad(np.full((12, 4), 255, np.uint8), 8)).save(path)
    return path


@pytest.mark.processes
@pytest.mark.parametrize("payload", ["numpy-scalar", "namespace", "runs-code", "truncated", "random"])
def test_a_foreign_checkpoint_is_classified_by_its_contents_in_every_command(foreign, payload, tmp_path):
    path, needle = foreign[payload]
    commands = {
        "evaluate": ["evaluate", "--checkpoint", str(path), f"data.root={tmp_path}", "data.download=false"],
        "predict": ["predict", "--checkpoint", str(path), str(digit_png(tmp_path))],
        "export": ["export", "--checkpoint", str(path), "--format", "safetensors", "--out", str(tmp_path / "m.st")],
        "resume": ["train", f"train.resume={path}", f"run.dir={tmp_path / 'run'}", f"data.root={tmp_path}"],
    }
    for command, args in commands.items():
        result = run_job(args)
        assert result.returncode == 2, (command, result.stderr)
        line = assert_one_line_error(result, needle)
        assert "weights_only=False" not in result.stderr + result.stdout, "never advise running the file's code"
        if payload in ("numpy-scalar", "namespace", "runs-code"):
            assert "not a weights-only file" in line and "truncated" not in line, (command, line)
            assert "torch.save(model.state_dict(), path)" in line
    assert not (path.parent / "pwned").exists(), "the file's code never ran"
    assert not (tmp_path / "m.st").exists() and not (tmp_path / "run").exists()


@pytest.mark.processes
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_weights_saved_through_ddp_or_torch_compile_are_read_as_the_same_weights(prefix, tmp_path):
    weights = Net().state_dict()
    torch.save({prefix + key: value for key, value in weights.items()}, tmp_path / "wrapped.pt")
    torch.save(weights, tmp_path / "plain.pt")
    png = digit_png(tmp_path)
    wrapped = run_job(["predict", "--json", "--checkpoint", str(tmp_path / "wrapped.pt"), str(png)])
    plain = run_job(["predict", "--json", "--checkpoint", str(tmp_path / "plain.pt"), str(png)])
    assert_ok(wrapped)
    assert wrapped.stdout == plain.stdout


# --- 3. paths written with ~ ------------------------------------------------------------------


@pytest.mark.processes
def test_tilde_paths_are_the_home_directory_everywhere(tiny_root, tmp_path):
    home = tmp_path / "home"
    (home / "mnist-data").mkdir(parents=True)
    (home / "mnist-data" / "MNIST").symlink_to(tiny_root / "MNIST")
    env = clean_env(HOME=str(home))
    args = ["train", *tiny_overrides(tiny_root, Path("unused"), "train.epochs=1")]
    args = [a for a in args if not a.startswith(("data.root=", "run.dir="))]
    result = run_job([*args, "data.root=~/mnist-data", "run.dir=~/runs/x"], env=env)
    assert_ok(result)
    run_dir = home / "runs" / "x"
    assert RunDir(run_dir).model.is_file() and not (REPO / "~").exists()
    assert f"results in {run_dir}" in result.stdout
    config = RunDir(run_dir).config.read_text()
    assert f"root: {home / 'mnist-data'}" in config and f"dir: {run_dir}" in config

    exported = run_job(
        ["export", "--checkpoint", "~/runs/x/model.pt", "--format", "safetensors", "--out", "~/m.safetensors"], env=env
    )
    assert_ok(exported)
    assert (home / "m.safetensors").is_file()
    (home / "digit.png").write_bytes(digit_png(tmp_path).read_bytes())
    assert_ok(run_job(["predict", "--checkpoint", "~/runs/x/model.pt", "~/digit.png"], env=env))
    resumed = run_job([*args, "data.root=~/mnist-data", "run.dir=~/runs/y", "train.resume=~/runs/x/model.pt"], env=env)
    assert_one_line_error(resumed, f"{RunDir(run_dir).model} is not a training checkpoint")


# --- 4, 5. the rendezvous: a port another program holds, an address that does not resolve ----


def start_ranks_by_hand(master_addr: str, port: int, timeout_s: int, tmp_path: Path) -> list[subprocess.Popen[str]]:
    """Two ranks with MASTER_ADDR/MASTER_PORT set by hand, as a user without a launcher starts them."""
    ranks = []
    for rank in range(2):
        env = clean_env(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
            MASTER_ADDR=master_addr, MASTER_PORT=str(port),
        )  # fmt: skip
        args = [sys.executable, "-m", "job", "train", f"dist.timeout_s={timeout_s}", f"run.dir={tmp_path / 'run'}"]
        ranks.append(
            subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return ranks


def finish(ranks: list[subprocess.Popen[str]], within_s: float) -> list[tuple[int, str]]:
    """Each rank's exit code and stderr; a rank still waiting after `within_s` fails the test."""
    results = []
    for process in ranks:
        try:
            _, err = process.communicate(timeout=within_s)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"a rank was still waiting after {within_s} s: {process.communicate()[1][-2000:]}")
        results.append((process.returncode, err))
    return results


@pytest.mark.processes
def test_a_rendezvous_port_held_by_another_program_fails_every_rank_with_one_line(tmp_path):
    with socket.socket() as foreign_listener:  # accepts connections, never answers
        foreign_listener.bind(("127.0.0.1", 0))
        foreign_listener.listen(16)
        port = foreign_listener.getsockname()[1]
        # Generous for a loaded 2-core machine: 5 s of timeout, a 25% margin, interpreter start-up.
        results = finish(start_ranks_by_hand("127.0.0.1", port, 5, tmp_path), within_s=120)
    for code, err in results:
        assert code == 2, err
        errors = [line for line in err.splitlines() if "error: " in line]
        assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "pick a free MASTER_PORT" in errors[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.processes
def test_an_address_that_does_not_resolve_is_the_last_and_only_line(tmp_path):
    results = finish(start_ranks_by_hand("no-such-host.invalid", 29500, 5, tmp_path), within_s=120)
    for code, err in results:
        assert code == 2
        lines = [line for line in err.splitlines() if line.strip()]
        assert all("c10d" not in line and "socket.cpp" not in line for line in lines), err
    rank0_err = results[0][1].strip().splitlines()
    assert rank0_err[-1].startswith("[rank 0] error: MASTER_ADDR=no-such-host.invalid does not resolve"), rank0_err
