"""The same run on every rank: config, code and what the bits depend on, compared once at start.

Nodes are started one by one (a pod, a Slurm task, a shell on each host), so one can run other
code, another torch, or a command with one override more. Nothing in DDP notices: a rank with
another `optim.lr` trains other weights (the ranks' models drift apart silently), another `seed`
draws an overlapping shard, another `train.epochs` or code version calls a collective the
others do not (gloo aborts, or every rank waits dist.timeout_s): retried as run-time failures
although no retry can help. So after the process group exists and before any step or write,
every rank hands its identity (run_identity) to every other in one all_gather_object, and each
rank stops with the same one line (exit 2) naming the keys and the ranks that differ.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch.distributed as dist

from job.config import PATH_KEYS, Config, config_to_dict, show
from job.errors import ConfigError
from job.process_group import DistContext

PER_HOST_KEYS = PATH_KEYS
"""Config keys that may differ between nodes: paths name a place on each host's own file system.
data.root is where that host keeps (or fetches) MNIST, and the data's identity is its sha256
(data.verify); run.dir and train.resume are read and written by rank 0 only, the other ranks'
values are never used; and `~` in any of them expands to each host's own home directory."""

PACKAGE = Path(__file__).resolve().parent
SHOWN_KEYS = 3
"""Keys a disagreement names before it says how many more differ."""


def run_identity(cfg: Config, environment: dict[str, Any]) -> dict[str, Any]:
    """What must be equal on every rank, key -> value: each config key (dotted, resolved) except
    PER_HOST_KEYS; `code job/<file>.py` -> a digest of each source file of the job package this
    process imported (so a copy where one constant differs shows, with or without git); and
    `environment` (seeding.bit_environment: the torch version, device type, threads per rank...)."""
    identity = {key: value for key, value in _flat(config_to_dict(cfg)).items() if key not in PER_HOST_KEYS}
    identity.update(code_digests())
    identity.update(environment)
    return identity


def code_digests(package: Path = PACKAGE) -> dict[str, str]:
    """`code job/<path>` -> the first 12 hex digits of the sha256 of each .py file of the package."""
    return {
        f"code job/{path.relative_to(package).as_posix()}": hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for path in sorted(package.rglob("*.py"))
    }


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_run(ctx: DistContext, identity: dict[str, Any]) -> None:
    """Every rank's run_identity on every rank (one all_gather_object on the control group; nothing
    at world size 1); ConfigError (exit 2) on every rank when any key differs."""
    if ctx.world_size == 1:
        return
    identities: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(identities, identity, group=ctx.control_group)
    problem = disagreement(identities)
    if problem:
        raise ConfigError(problem)


_ABSENT = object()


def disagreement(identities: list[dict[str, Any]]) -> str | None:
    """The one line naming the keys whose values differ between ranks (rank = index), the ranks
    holding each value, and the fix; None when every rank holds the same identity."""
    keys = list(dict.fromkeys(key for identity in identities for key in identity))
    differing = []
    for key in keys:
        holders: dict[str, list[int]] = {}  # shown value -> ranks, in order of the first rank holding it
        for rank, identity in enumerate(identities):
            value = identity.get(key, _ABSENT)
            holders.setdefault("absent" if value is _ABSENT else show(value), []).append(rank)
        if len(holders) > 1:
            differing.append(f"{key} is " + " but ".join(f"{value} on {_ranks(r)}" for value, r in holders.items()))
    if not differing:
        return None
    more = len(differing) - SHOWN_KEYS
    named = "; ".join(differing[:SHOWN_KEYS]) + (f"; and {more} more key(s)" if more > 0 else "")
    return (
        f"ranks disagree on the run: {named}; start every node with the same config, code and torch, on the "
        "same kind of device and threads per rank (OMP_NUM_THREADS or CPU limit)"
    )


def _ranks(ranks: list[int]) -> str:
    """`rank 1`, `ranks 0, 1`, `ranks 0-31, 33`: runs of three or more consecutive ranks as ranges."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    text = ", ".join(", ".join(map(str, r)) if len(r) < 3 else f"{r[0]}-{r[-1]}" for r in runs)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"
