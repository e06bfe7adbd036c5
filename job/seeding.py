"""Rank-aware seeding and determinism switches: every random stream derives from one seed.

- Parameter init: `torch.manual_seed(seed)` on every rank, as the tutorial does, so
  every rank builds the same initial weights (DDP's broadcast from rank 0 then
  changes nothing, and W=1 starts from the tutorial's weights).
- Per-rank streams (dropout masks, python `random`): a seed derived from (seed, rank),
  so ranks draw different masks instead of dropping the same units on every shard.
- Data order: DistributedSampler's own generator, seeded with `seed + epoch`,
  identical on every rank and independent of the streams above.
- Resume: a checkpoint holds every rank's stream states (`rng_state`), so a resumed
  rank draws the very masks it would have drawn uninterrupted.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import torch

from job.cpu_kernels import cpu_capability


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


def reseed_rank_streams_after_resize(seed: int, rank: int, global_step: int) -> None:
    """Fresh per-rank streams for a resume at another world size, where old streams cannot map
    one-to-one onto the new ranks: still derived from the seed, and distinct per rank and resume."""
    rank_seed = derive_seed(seed, f"rank-streams-resized-at-{global_step}", rank)
    torch.manual_seed(rank_seed)
    random.seed(rank_seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's generator states (CPU, the CUDA device's, python's), as a checkpoint keeps them."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def configure_numerics(deterministic: bool, tf32: bool) -> None:
    """Deterministic kernels when asked (without torch's NaN fills of new tensors), and fp32 or TF32
    on GPUs; must run before the first CUDA call.

    cuDNN convolutions run in TF32 on Ampere and later unless told otherwise
    (torch.backends.cudnn.allow_tf32 defaults to True), which is not the fp32 recipe and not
    what other GPU generations compute: off unless speed.tf32 asks for it.
    """
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        # cuBLAS picks reduction orders per workspace; a fixed workspace makes them repeatable.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    # Deterministic mode also fills every new tensor (torch.empty & co.) with NaN or the largest
    # integer first, so that a kernel reading memory it never wrote gives a repeatable result
    # (torch.utils.deterministic.fill_uninitialized_memory, on by default): 23 extra fills per step
    # on CPU, one kernel each on CUDA (issue 25). The job's kernels write every element they return,
    # so the bits stay the same without them: tests/probes/no_nan_fills.py trains 30 DDP steps both
    # ways at 1 and 2 ranks (CPU, gloo) and `make gpu-check`'s no-nan-fills step does so on CUDA.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def bit_environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """What a run's bits depend on besides its config: the same config and these values give
    the same weights, bit for bit (in deterministic mode). Threads per rank change how CPU
    kernels split their sums; another torch or CUDA version, device type or CPU instruction set
    (job/cpu_kernels.py), other kernels."""
    environment: dict[str, Any] = {
        "world_size": world_size,
        "device": device.type,
        "threads_per_rank": torch.get_num_threads(),
        "torch": str(torch.__version__),  # a str: TorchVersion is not a weights-only global
    }
    if device.type == "cpu":
        environment["cpu_capability"] = cpu_capability()
    if device.type == "cuda":
        environment["cuda"] = torch.version.cuda
        environment["gpu"] = torch.cuda.get_device_name(device)
    return environment
