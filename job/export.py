"""`python -m job export`: the trained net as a file other tools load without this package.

safetensors holds only the tensors (no code, loadable from Rust, JS, ...): rebuild the net
from job/model.py (or its layer list) and load them. TorchScript holds the net's code too:
`torch.jit.load(FILE)` runs it in any PyTorch, C++ included. Both give log-probabilities
of the ten digits for a (N, 1, 28, 28) batch normalised with MNIST's mean and std.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from job.errors import BadInputError

if TYPE_CHECKING:
    import torch

FORMATS = {"safetensors": "safetensors", "torchscript": "pt"}
"""Each format the CLI offers, with the file suffix it suggests. torch is imported only when a
file is written, so the CLI can list these without paying for it."""


def safetensors_bytes(model: torch.nn.Module) -> bytes:
    from safetensors.torch import save

    from job.data import MEAN, STD

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    # The metadata says how to feed the net, for whoever opens the file without this README.
    metadata = {"model": "job.model.Net", "input": "(N, 1, 28, 28) float32", "mean": str(MEAN), "std": str(STD)}
    return save(state, metadata=metadata)


def torchscript_bytes(model: torch.nn.Module) -> bytes:
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated in favour of torch.export, but it is still the
        # format libtorch (C++) and older PyTorch load; README says so once instead of every export.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.(script|save)` is deprecated", category=FutureWarning)
        scripted = torch.jit.script(model)  # script, not trace: dropout's train/eval switch is kept as code
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def run_export(checkpoint: str, fmt: str, out: str) -> Path:
    """Write the weights of a model.pt or checkpoint as `fmt` (a key of FORMATS) to `out`; returns the
    path written. A bad checkpoint or output path raises BadInputError."""
    from job.model import load_model
    from job.safe_io import atomic_write_bytes

    model = load_model(checkpoint)
    payload = safetensors_bytes(model) if fmt == "safetensors" else torchscript_bytes(model)
    path = Path(out)
    if path.is_dir():
        raise BadInputError(f"--out {path} is a directory; pass a file name, e.g. {path / ('model.' + FORMATS[fmt])}")
    if not path.parent.is_dir():
        raise BadInputError(f"--out {path}: directory {path.parent} does not exist; create it or choose another path")
    try:
        atomic_write_bytes(path, payload)
    except OSError as e:
        raise BadInputError(f"cannot write {path} ({e.strerror}); choose a writable --out") from None
    return path
