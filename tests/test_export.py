"""export: each file gives the checkpoint's outputs in its own runtime (safetensors in torch, onnx in
onnxruntime, pt2 through torch.export.load) at any batch size and says which run made it; bad input
is one line and writes nothing. On real MNIST, all 10,000 test digits: test_real_mnist.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, assert_ok, assert_one_line_error, run_job, write_random_model

from job.errors import BadInputError
from job.export import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, PT2_METADATA, onnx_reader, run_export, run_figures
from job.model import Net
from job.provenance import REVISION_ENV, source_commit
from job.run_dir import RunDir

SUMMARY = {"test_accuracy": 0.9876, "commit": "0123456789abcdef0123456789abcdef01234567", "count": 10000}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run's directory as the exports read it: model.pt (random weights) and summary.json,
    with a training checkpoint holding the same weights beside them."""
    folder = write_random_model(tmp_path_factory.mktemp("export"), seed=3)
    RunDir(folder).summary.write_text(json.dumps(SUMMARY))
    return folder


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each format written once by the CLI: onnx and safetensors from model.pt, pt2 from the checkpoint."""
    folder = tmp_path_factory.mktemp("exported")
    sources = {"safetensors": "model.pt", "onnx": "model.pt", "pt2": "step-000000938.pt"}
    files = {}
    for fmt, source in sources.items():
        files[fmt] = folder / f"model.{fmt}"
        result = run_job(["export", "--checkpoint", str(run / source), "--format", fmt, "--out", str(files[fmt])])
        assert_ok(result)
        assert result.stderr == "", "no warning reaches the user"
    return files


def reference(run: Path, batch: torch.Tensor) -> torch.Tensor:
    model = Net()
    model.load_state_dict(torch.load(RunDir(run).model, weights_only=True))
    with torch.no_grad():
        return model.eval()(batch)


def batch(n: int) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))


@pytest.mark.processes
def test_safetensors_export_gives_the_same_outputs(run, exported):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = Net()
    model.load_state_dict(load_file(exported["safetensors"]))
    with torch.no_grad():
        assert torch.equal(model.eval()(batch(16)), reference(run, batch(16)))
    with safe_open(exported["safetensors"], "pt") as f:
        assert f.metadata()["mean"] == "0.1307" and f.metadata()["std"] == "0.3081"
        assert f.metadata()["test_accuracy"] == "0.9876" and f.metadata()["commit"] == SUMMARY["commit"]


@pytest.mark.processes
def test_onnx_export_runs_in_onnxruntime_at_any_batch_size_and_names_its_run(run, exported):
    import onnx
    import onnxruntime

    proto = onnx.load(exported["onnx"])
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain == ""] == [("", ONNX_OPSET)]
    assert [i.name for i in proto.graph.input] == [INPUT_NAME] and [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "the batch dimension is symbolic"
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["mean"] == "0.1307" and metadata["std"] == "0.3081" and metadata["input_shape"] == "N,1,28,28"
    assert metadata["labels"] == "0,1,2,3,4,5,6,7,8,9"
    assert metadata["test_accuracy"] == "0.9876" and metadata["commit"] == SUMMARY["commit"]

    session = onnxruntime.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    for n in (1, 7, 1000):
        expected = reference(run, batch(n))
        (got,) = session.run(None, {INPUT_NAME: batch(n).numpy()})
        assert got.shape == (n, 10)
        assert np.abs(got - expected.numpy()).max() <= 1e-4, n
        assert np.array_equal(got.argmax(1), expected.argmax(1).numpy()), n


@pytest.mark.processes
def test_pt2_export_of_a_training_checkpoint_runs_at_any_batch_size(run, exported):
    extra = {PT2_METADATA: ""}
    program = torch.export.load(exported["pt2"], extra_files=extra)
    for n in (1, 1000):
        assert torch.equal(program.module()(batch(n)), reference(run, batch(n))), n
    metadata = json.loads(extra[PT2_METADATA])
    assert metadata["mean"] == "0.1307" and metadata["labels"] == "0,1,2,3,4,5,6,7,8,9"
    # A checkpoint mid-run has no summary of its own: its figures are unknown, not the final model's.
    assert metadata["test_accuracy"] == "unknown" and metadata["commit"] == "unknown"


@pytest.mark.processes
def test_export_refuses_bad_input_in_one_line_and_writes_nothing(run, tmp_path):
    model = str(RunDir(run).model)
    removed = run_job(["export", "--checkpoint", model, "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
    assert_one_line_error(removed, "--format", "invalid choice: 'torchscript'", "onnx", "pt2")

    missing = run_job(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--format", "safetensors", "--out", "x"])
    assert_one_line_error(missing, "nope.pt does not exist")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(Path(model).read_bytes()[:400])
    result = run_job(["export", "--checkpoint", str(corrupt), "--format", "onnx", "--out", str(tmp_path / "o.onnx")])
    assert_one_line_error(result, "truncated or corrupt")

    foreign = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, foreign)
    result = run_job(["export", "--checkpoint", str(foreign), "--format", "pt2", "--out", str(tmp_path / "o.pt2")])
    assert_one_line_error(result, "does not fit the model")

    for fmt in ("safetensors", "onnx", "pt2"):
        no_dir = run_job(["export", "--checkpoint", model, "--format", fmt, "--out", str(tmp_path / f"a/b.{fmt}")])
        assert_one_line_error(no_dir, "does not exist; create it")
    a_dir = run_job(["export", "--checkpoint", model, "--format", "onnx", "--out", str(tmp_path)])
    assert_one_line_error(a_dir, "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pt", "resnet.pt"], "nothing written on bad input"


def test_a_missing_export_extra_is_one_line_naming_the_install_command(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # None: `import onnxscript` fails
    with pytest.raises(BadInputError, match=re.escape("--format onnx needs onnxscript, not installed: pip install")):
        run_export(str(RunDir(run).model), "onnx", str(tmp_path / "m.onnx"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    hashed_install = "needs onnxruntime, not installed: pip install --require-hashes -r requirements.lock"
    with pytest.raises(BadInputError, match=re.escape(hashed_install)):
        onnx_reader(tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_the_run_figures_come_from_the_summary_beside_model_pt_else_unknown(run, tmp_path):
    assert run_figures(RunDir(run).model) == {"commit": SUMMARY["commit"], "test_accuracy": "0.9876"}
    assert run_figures(run / "step-000000938.pt") == {"commit": "unknown", "test_accuracy": "unknown"}
    RunDir(tmp_path).summary.write_text('{"test_accuracy": 0.9')  # cut short mid-write
    assert run_figures(RunDir(tmp_path).model) == {"commit": "unknown", "test_accuracy": "unknown"}
    RunDir(tmp_path).summary.write_text('{"test_accuracy": 0.95}')  # written before summaries named the commit
    assert run_figures(RunDir(tmp_path).model) == {"commit": "unknown", "test_accuracy": "0.95"}


def test_the_commit_comes_from_the_checkout_else_the_images_revision_else_unknown(tmp_path, monkeypatch):
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", source_commit(REPO))
    monkeypatch.setenv(REVISION_ENV, "feedface")
    assert source_commit(tmp_path) == "feedface", "no .git here: the image's label"
    monkeypatch.delenv(REVISION_ENV)
    assert source_commit(tmp_path) == "unknown"
