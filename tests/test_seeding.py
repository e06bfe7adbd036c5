"""Seeding: one seed, identical initial weights, distinct per-rank streams, deterministic switches."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_ok, run_probe

from job.model import Net
from job.seeding import configure_numerics, derive_seed, seed_parameter_init, seed_rank_streams


def test_derived_seeds_are_stable_and_distinct():
    seeds = {derive_seed(1, stream, rank) for stream in ("a", "b") for rank in range(8)}
    assert len(seeds) == 16
    assert derive_seed(1, "a", 0) == derive_seed(1, "a", 0)
    assert derive_seed(1, "a", 0) != derive_seed(2, "a", 0)
    assert all(0 <= s < 2**63 for s in seeds)


def test_parameter_init_is_the_same_for_every_rank():
    seed_parameter_init(1)
    first = Net().state_dict()
    seed_rank_streams(1, rank=5)  # whatever a rank drew before, init starts from the seed again
    torch.rand(10)
    seed_parameter_init(1)
    second = Net().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def _dropout_mask(seed: int, rank: int) -> torch.Tensor:
    seed_rank_streams(seed, rank)
    return torch.nn.functional.dropout(torch.ones(1000), p=0.5, training=True)


def test_dropout_streams_differ_per_rank_and_repeat_per_rank():
    assert not torch.equal(_dropout_mask(1, 0), _dropout_mask(1, 1))
    assert torch.equal(_dropout_mask(1, 1), _dropout_mask(1, 1))


def test_determinism_switches():
    try:
        configure_numerics(True, tf32=False)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        configure_numerics(False, tf32=False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    finally:
        configure_numerics(False, tf32=False)
        torch.backends.cudnn.benchmark = False


@pytest.mark.processes
@pytest.mark.parametrize("nproc", [1, 2])
def test_deterministic_mode_skips_the_nan_fills_and_keeps_the_bits(nproc):
    """configure_numerics turns torch's NaN fills of new tensors off (issue 25: 23 fill kernels a step
    on CPU), and 30 DDP steps through the job's gradient hook give the same weights, bit for bit,
    with and without them (tests/probes/no_nan_fills.py; on CUDA: make gpu-check's no-nan-fills)."""
    assert_ok(run_probe("no_nan_fills.py", [], nproc=nproc))
