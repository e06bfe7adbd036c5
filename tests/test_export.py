"""export: the written file gives the same outputs as the checkpoint it came from; bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_ok, assert_one_line_error, run_job, write_random_model

from job.model import Net

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt of a net with random weights, and a training checkpoint holding the same weights."""
    return write_random_model(tmp_path_factory.mktemp("export"), seed=3)


def reference_outputs(checkpoint: Path, batch: torch.Tensor) -> torch.Tensor:
    model = Net()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.eval()(batch)


def batch() -> torch.Tensor:
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_safetensors_export_gives_the_same_outputs(checkpoints, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    assert_ok(
        run_job(["export", "--checkpoint", str(checkpoints / "model.pt"), "--format", "safetensors", "--out", str(out)])
    )
    model = Net()
    model.load_state_dict(load_file(out))
    with torch.no_grad():
        assert torch.equal(model.eval()(batch()), reference_outputs(checkpoints / "model.pt", batch()))
    with safe_open(out, "pt") as f:
        assert f.metadata()["mean"] == "0.1307" and f.metadata()["std"] == "0.3081"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_of_a_training_checkpoint_gives_the_same_outputs(checkpoints, tmp_path):
    out = tmp_path / "model.pt"
    args = [
        "export",
        "--checkpoint",
        str(checkpoints / "step-000000938.pt"),
        "--format",
        "torchscript",
        "--out",
        str(out),
    ]
    result = run_job(args)
    assert_ok(result)
    assert "Warning" not in result.stderr, result.stderr
    scripted = torch.jit.load(out)  # no job.model import needed: the code is in the file
    with torch.no_grad():
        assert torch.equal(scripted(batch()), reference_outputs(checkpoints / "model.pt", batch()))
    assert not scripted.training


def test_export_refuses_bad_input_in_one_line(checkpoints, tmp_path):
    model = str(checkpoints / "model.pt")
    bad_format = run_job(["export", "--checkpoint", model, "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert_one_line_error(bad_format, "--format", "invalid choice: 'onnx'")

    missing = run_job(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--format", "safetensors", "--out", "x"])
    assert_one_line_error(missing, "nope.pt does not exist")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(Path(model).read_bytes()[:400])
    result = run_job(["export", "--checkpoint", str(corrupt), "--format", "torchscript", "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "truncated or corrupt")

    no_dir = run_job(["export", "--checkpoint", model, "--format", "safetensors", "--out", str(tmp_path / "a/b.st")])
    assert_one_line_error(no_dir, "does not exist; create it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pt"], "nothing written on bad input"
