"""Fixtures only; the helpers they use, and the tests use, are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_tiny_mnist


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated MNIST-layout dataset: 512 training and 203 test samples."""
    return make_tiny_mnist(tmp_path_factory.mktemp("tiny") / "data")
