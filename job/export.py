"""`python -m job export`: the trained net as a file other tools load without this package.

- safetensors: only the tensors (no code; readable from Rust, JavaScript, ...): rebuild the
  net from job/model.py and load them.
- onnx: the net as an ONNX graph (opset ONNX_OPSET) from torch's torch.export-based exporter,
  for onnxruntime (Python, C/C++, C#, Java, the browser), Triton and the like.
- pt2: torch.export's ExportedProgram (`torch.export.load`; AOTInductor, ExecuTorch).

Each maps a float32 batch (N, 1, 28, 28) of MNIST-like digits normalised with MNIST's mean
and std to the log-probabilities (N, 10) of the digits 0-9; N is free in onnx and pt2. Each
file carries `model_metadata`: how to feed the net and which run trained it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from job.errors import BadInputError, message_line
from job.files import read_regular

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import torch

FORMATS = {"safetensors": "safetensors", "onnx": "onnx", "pt2": "pt2"}
"""Each format the CLI offers, with the file suffix it suggests. torch is imported only when a
file is written, so the CLI can list these without paying for it."""

ONNX_OPSET = 20
"""The ONNX opset written: torch 2.14's exporter's own (no version conversion); onnxruntime
reads it since 1.17."""

INPUT_NAME, OUTPUT_NAME = "image", "log_probs"
"""The graph's input and output names in the onnx file."""

INSTALL_EXPORT_EXTRA = "pip install --require-hashes -r requirements.lock in the repository (make setup does)"


def require(modules: tuple[str, ...], purpose: str) -> None:
    """Import `modules` (the `export` extra's), or BadInputError naming the install command."""
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise BadInputError(f"{purpose} needs {' and '.join(missing)}, not installed: {INSTALL_EXPORT_EXTRA}")


def run_figures(checkpoint: Path) -> dict[str, str]:
    """The commit and test accuracy of the run whose model.pt `checkpoint` is, from its summary.json;
    "unknown" for what is not recorded (a checkpoint mid-run, a file outside a run directory)."""
    from job.run_dir import RunDir

    figures = {"commit": "unknown", "test_accuracy": "unknown"}
    run = RunDir(checkpoint.parent)
    if checkpoint.name != run.model.name or not run.summary.is_file():
        return figures
    try:
        summary = json.loads(run.summary.read_text())
    except (OSError, ValueError):
        return figures
    if isinstance(summary, dict):
        if isinstance(summary.get("commit"), str):
            figures["commit"] = summary["commit"]
        if isinstance(summary.get("test_accuracy"), (int, float)):
            figures["test_accuracy"] = str(summary["test_accuracy"])
    return figures


def model_metadata(checkpoint: Path) -> dict[str, str]:
    """What a user of the file needs to feed it and to know where it came from (string values:
    safetensors' metadata, onnx's metadata_props and pt2's metadata.json alike)."""
    from job.data import MEAN, STD

    return {
        "model": "mnist-ddp job.model.Net",
        "input": "float32 (N, 1, 28, 28): MNIST-like digits, light ink on black, (pixel / 255 - mean) / std",
        "input_shape": "N,1,28,28",
        "output": "float32 (N, 10): the log-probabilities of the labels",
        "labels": ",".join(str(digit) for digit in range(10)),
        "mean": str(MEAN),
        "std": str(STD),
        **run_figures(checkpoint),
    }


def safetensors_bytes(model: torch.nn.Module, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, metadata=metadata)


def _example_and_dynamic_batch() -> tuple[tuple[torch.Tensor], tuple[dict[int, object]]]:
    import torch

    # An example batch of 2, not 1: torch.export specialises a dimension it sees as 1.
    return (torch.zeros(2, 1, 28, 28),), ({0: torch.export.Dim("batch", min=1)},)


def onnx_bytes(model: torch.nn.Module, metadata: dict[str, str]) -> bytes:
    import onnx
    import torch

    example, dynamic_shapes = _example_and_dynamic_batch()
    program = torch.onnx.export(
        model,
        example,
        dynamo=True,  # the torch.export-based exporter (TorchScript's is deprecated)
        opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    return proto.SerializeToString()


PT2_METADATA = "metadata.json"
"""The extra file in a pt2 archive holding model_metadata: torch.export.load(f, extra_files={PT2_METADATA: ""})."""


def pt2_bytes(model: torch.nn.Module, metadata: dict[str, str]) -> bytes:
    import io

    import torch

    example, dynamic_shapes = _example_and_dynamic_batch()
    program = torch.export.export(model, example, dynamic_shapes=dynamic_shapes)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={PT2_METADATA: json.dumps(metadata, indent=2)})
    return buffer.getvalue()


def check_out_path(path: Path, fmt: str) -> None:
    if path.is_dir():
        raise BadInputError(f"--out {path} is a directory; pass a file name, e.g. {path / ('model.' + FORMATS[fmt])}")
    if not path.parent.is_dir():
        raise BadInputError(f"--out {path}: directory {path.parent} does not exist; create it or choose another path")


def run_export(checkpoint: str, fmt: str, out: str) -> Path:
    """Write the weights of a model.pt or checkpoint as `fmt` (a key of FORMATS) to `out`, whole or
    not at all; returns the path written. A bad path, checkpoint or missing extra raises BadInputError."""
    path = Path(out)
    check_out_path(path, fmt)  # before the slow part
    if fmt == "onnx":
        require(("onnx", "onnxscript"), "--format onnx")

    from job.model import load_model
    from job.safe_io import atomic_write_bytes

    model = load_model(checkpoint)
    write = {"safetensors": safetensors_bytes, "onnx": onnx_bytes, "pt2": pt2_bytes}[fmt]
    payload = write(model, model_metadata(Path(checkpoint)))
    try:
        atomic_write_bytes(path, payload)
    except OSError as e:
        raise BadInputError(f"cannot write {path} ({e.strerror}); choose a writable --out") from None
    return path


def onnx_reader(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """An exported onnx file, run by onnxruntime: a function from a (N, 1, 28, 28) float32 batch to
    its (N, 10) log-probabilities. A missing file, or one that is not such a model, raises BadInputError."""
    require(("onnxruntime",), "--model (an onnx file)")
    import onnxruntime

    path = Path(path)
    onnx = read_regular(path, "model", "pass an onnx file (python -m job export --format onnx)")
    try:
        session = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...) have no common base
        raise BadInputError(f"model {path} is not an onnx model onnxruntime can load ({message_line(e)})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if (
        len(inputs) != 1
        or inputs[0].type != "tensor(float)"
        or list(inputs[0].shape)[1:] != [1, 28, 28]
        or len(outputs) != 1
        or list(outputs[0].shape)[1:] != [10]
    ):
        maps = f"{_signature(inputs)} -> {_signature(outputs)}"
        raise BadInputError(f"model {path} is not a digit reader: it maps {maps}, not float (N, 1, 28, 28) -> (N, 10)")
    name = inputs[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def _signature(args: list) -> str:
    """onnxruntime's inputs or outputs as `float (N, 3), int64 (2)`."""
    return ", ".join(f"{a.type.removeprefix('tensor(').rstrip(')')} ({', '.join(map(str, a.shape))})" for a in args)
