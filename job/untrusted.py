"""Loading files that may not be ours (checkpoints, model.pt, exports) without executing anything.

Weights files are read whole, bounded before anything is allocated (MAX_WEIGHTS_BYTES, on disk
and unpacked), and unpickled with `torch.load(weights_only=True)`: tensors and plain containers,
never code. A file torch refuses is classified from its own bytes (a newer torch's archive, a
foreign pickle naming its global, or damage), never from torch's wording. Writing is
job/safe_io.py's; this module imports nothing from it.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from job import torch_private
from job.errors import BadInputError, NewerFileError, message_line
from job.files import not_a_regular_file, open_regular

MAX_WEIGHTS_BYTES = 64 * 2**20
"""The most a weights file may hold, on disk and unpacked: this net's checkpoint is about 0.2 MB
(model, momentum, one RNG state per rank: ~10 KB a rank, so 64 MiB is several thousand ranks).
Checked before anything is allocated: a 1.5 MB zip can unpack to gigabytes."""


def read_weights_file(path: str | Path) -> bytes:
    """A weights file's bytes, at most MAX_WEIGHTS_BYTES; BadInputError when missing, unreadable or larger."""
    path = Path(path)
    with open_regular(path, "checkpoint", "pass the path of a model.pt or checkpoint file") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_WEIGHTS_BYTES:
                raise BadInputError(_too_big(path, size))
            return f.read()
        except OSError as e:
            raise BadInputError(f"checkpoint {path} cannot be read ({e.strerror})") from None


def _too_big(name: str | Path, size: int) -> str:
    return (
        f"checkpoint {name} holds {size / 2**20:,.0f} MiB, more than the {MAX_WEIGHTS_BYTES / 2**20:.0f} MiB a "
        "checkpoint of this net can need (about 0.2 MB); it is not one of this job's files"
    )


def load_weights_only(path: str | Path) -> Any:
    """torch.load of a file with weights_only=True: tensors and plain containers, never code.
    A missing, unreadable, oversized, damaged or not weights-only file raises BadInputError."""
    return loads_weights_only(read_weights_file(path), path)


def load_weights(path: str | Path) -> Any:
    """A model file's contents, loading no code: a torch.save file (model.pt, a checkpoint) through
    load_weights_only, or a safetensors file (what `python -m job export` writes) as its tensors.
    BadInputError as load_weights_only."""
    path = Path(path)
    if not_a_regular_file(path) is None and _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(read_weights_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise BadInputError(f"{path} is a damaged safetensors file ({message_line(e)})") from None
    return load_weights_only(path)


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with the length of their JSON header (8 bytes, little-endian), then `{`."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def loads_weights_only(data: bytes, name: str | Path) -> Any:
    """load_weights_only for a file's bytes (as rank 0 broadcasts them); `name` is for messages.

    A file that torch refuses is classified from its own contents, not from torch's wording
    (which changes between versions and advises loading with weights_only=False, i.e. running
    the file's code): an intact archive whose pickle needs a global besides tensors and plain
    containers is "not a weights-only file", naming the global; anything else is damaged.
    """
    unpacked = _unpacked_size(data)
    if unpacked > MAX_WEIGHTS_BYTES:
        raise BadInputError(_too_big(f"{name} (unpacked)", unpacked))
    try:
        with warnings.catch_warnings():  # torch's remarks on a foreign file's pickle protocol: noise here
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        version = archive_version(data)
        if version is not None and version > readable_archive_version():
            raise NewerFileError(
                f"checkpoint {name} was written by a newer torch: its archive is format version {version} and this "
                f"torch ({torch.__version__}) reads up to version {readable_archive_version()}; the file is intact "
                "and was left as it is: use the newer torch that wrote it (or a later one)"
            ) from None
        foreign = foreign_globals(data)
        if foreign:
            raise BadInputError(
                f"checkpoint {name} is not a weights-only file and was not loaded: besides tensors it holds "
                f"{foreign[0]}, which loading weights only refuses; if you trust it, load it in the program that "
                "wrote it and save just the weights: torch.save(model.state_dict(), path)"
            ) from None
        raise BadInputError(
            f"checkpoint {name} is truncated or corrupt ({_damage(data, e)}); use an intact copy"
        ) from None


def archive_version(data: bytes) -> int | None:
    """The format version a torch.save archive declares (its `<folder>/.data/version` record, or
    `<folder>/version`, which torch's reader checks in that order), or None for bytes that are not
    such an archive."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            for suffix in ("/.data/version", "/version"):
                found = [n for n in names if n.endswith(suffix) and n.count("/") == suffix.count("/")]
                if found:
                    return int(archive.read(found[0]).strip())
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError):
        pass
    return None


def _with_archive_version(data: bytes, version: int) -> bytes:
    """A torch.save archive's bytes with its version record set to `version`."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as archive, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as copy:
        for entry in archive.infolist():
            record = archive.read(entry.filename)
            copy.writestr(entry, f"{version}\n".encode() if entry.filename.endswith("/version") else record)
    return out.getvalue()


@functools.cache
def readable_archive_version() -> int:
    """The highest torch.save archive format version this torch reads (torch 2.14: 10). torch does
    not expose it (C++'s kMaxSupportedFileFormatVersion), and its error's wording is no contract:
    found by loading a tiny archive stamped with each version above the one this torch writes,
    until one is refused (about 1 ms a version, once per process)."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(1), buffer)
    written = buffer.getvalue()
    version = archive_version(written) or 0
    while version < 1000:
        try:
            torch.load(io.BytesIO(_with_archive_version(written, version + 1)), weights_only=True)
        except RuntimeError:
            break
        version += 1
    return version


def _weights_only_globals() -> set[str] | None:
    """The globals torch's weights-only unpickler accepts (its default allow-list plus any this
    process added), from torch's private `_get_allowed_globals` (job/torch_private.py); None where it
    is missing."""
    allowed = torch_private.weights_only_default_globals()
    if allowed is None:
        return None
    added = [g for g in torch.serialization.get_safe_globals() if not isinstance(g, tuple)]
    return allowed | {f"{g.__module__}.{g.__qualname__}" for g in added}


# Without torch's list: what torch.save needs for tensors and containers, and any torch.* name.
_FALLBACK_GLOBALS = {"collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset"}


def _loads_weights_only(name: str, allowed: set[str] | None) -> bool:
    if allowed is not None:
        return name in allowed
    return name.startswith("torch.") or name in _FALLBACK_GLOBALS


def foreign_globals(data: bytes) -> list[str]:
    """The globals (module.name) that a torch.save archive's pickle references beyond tensors and
    plain containers, in order of appearance; empty when there are none or the bytes are not an
    intact archive. Reads the pickle's opcodes without executing any."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            (entry,) = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            pickled = archive.read(entry)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError):
        return []
    allowed = _weights_only_globals()
    found: list[str] = []
    strings: list[str] = []  # the latest string pushes: STACK_GLOBAL takes module and name from them
    memo: dict[int, str] = {}
    try:
        for op, arg, _ in pickletools.genops(pickled):
            if op.name == "GLOBAL":
                qualified = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                qualified = f"{strings[-2]}.{strings[-1]}"
            else:
                if isinstance(arg, str) and ("UNICODE" in op.name or op.name.endswith("STRING")):
                    strings.append(arg)
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[int(arg)] = strings[-1]
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                    strings.append(memo[int(arg)])
                continue
            if not _loads_weights_only(qualified, allowed) and qualified not in found:
                found.append(qualified)
    except ValueError:  # a pickle cut short: what was read so far still counts
        pass
    return found


def _unpacked_size(data: bytes) -> int:
    """What a torch.save archive's entries declare they unpack to (their sizes in the zip's own
    directory, read without unpacking); the byte count for anything else."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return len(data)


def _damage(data: bytes, error: BaseException) -> str:
    """What is wrong with bytes torch could not load, in words that do not depend on torch's."""
    if not data:
        return "the file is empty"
    if not zipfile.is_zipfile(io.BytesIO(data)):
        if data[:2] == b"\x80\x02":
            return "an unreadable legacy torch.save file"
        return "not a complete torch.save archive: cut short, or another format"
    if isinstance(error, pickle.UnpicklingError):  # torch's text is advice about trusting the file
        return "its pickle cannot be read as weights"
    return message_line(error)
