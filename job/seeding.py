"""Rank-aware seeding and determinism switches: every random stream derives from one seed.

- Parameter init: `torch.manual_seed(seed)` on every rank, as the tutorial does, so
  every rank builds the same initial weights (DDP's broadcast from rank 0 then
  changes nothing, and W=1 starts from the tutorial's weights).
- Per-rank streams (dropout masks, python `random`): a seed derived from (seed, rank),
  so ranks draw different masks instead of dropping the same units on every shard.
- Data order: DistributedSampler's own generator, seeded with `seed + epoch`,
  identical on every rank and independent of the streams above.
"""

from __future__ import annotations

import hashlib
import os
import random

import torch


def derive_seed(seed: int, stream: str, rank: int) -> int:
    """A 63-bit seed for one named stream on one rank; distinct per (seed, stream, rank)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_parameter_init(seed: int) -> None:
    """Seed the global generators for building the model: the same on every rank."""
    torch.manual_seed(seed)
    random.seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Seed the global generators (dropout, python random) with this rank's own stream."""
    rank_seed = derive_seed(seed, "rank-streams", rank)
    torch.manual_seed(rank_seed)
    random.seed(rank_seed)


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels when asked; must run before the first CUDA call."""
    if deterministic:
        # cuBLAS picks reduction orders per workspace; a fixed workspace makes them repeatable.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
