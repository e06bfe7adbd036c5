"""The seed tutorial's CNN: two conv layers, two linear layers, dropout (about 3 MFLOP/sample),
and loading its saved weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from job.errors import BadInputError, message_line
from job.untrusted import load_weights

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes a wrapper adds to a state dict it saves: DistributedDataParallel/DataParallel
(`module.`) and torch.compile (`_orig_mod.`). Weights saved through a wrapper are the same weights."""


def model_state_of(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state_dict from a loaded model.pt (a state_dict) or a training checkpoint (its
    `model` field, job/checkpoint.py), with wrapper prefixes (WRAPPER_PREFIXES) removed when every
    key carries one."""
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(f"checkpoint {path} holds no model state_dict; pass a model.pt or checkpoint file")
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(str(key).startswith(prefix) for key in state):
                state = {str(key)[len(prefix) :]: value for key, value in state.items()}
                stripped = True
    return state


class Net(nn.Module):
    """The tutorial's network, layer for layer; `dropout` sets both dropout layers (0: off)."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(p=dropout)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, p=self.dropout, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


def state_shapes() -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the net's state_dict, in its order (built on the meta device:
    no memory, and no draw from the random generators)."""
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in Net().state_dict().items()}


def load_model(checkpoint: str | Path, dropout: float = 0.5) -> Net:
    """The net with the weights of a model.pt, a training checkpoint or a safetensors export, in eval mode.

    Loads weights only (never code); a missing, damaged or foreign file, or one of another shape of
    model, raises BadInputError.
    """
    state = model_state_of(load_weights(checkpoint), checkpoint)
    model = Net(dropout=dropout)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # the last line names the first mismatching key and shapes
        raise BadInputError(f"checkpoint {checkpoint} does not fit the model: {message_line(e, last=True)}") from None
    return model.eval()
