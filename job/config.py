"""The job's configuration: typed dataclasses, YAML loading, KEY=VALUE overrides, validation.

Every field has a one-line docstring below it; docs/CONFIG.md's reference lists the same keys
at the same defaults (a test keeps the two in step).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from job.errors import ConfigError
from job.files import read_regular

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
MNIST_TRAIN_SIZE = 60_000


@dataclass
class DataConfig:
    root: str = "data"
    """Directory that holds MNIST/raw/ (torchvision's layout); fetched there when missing."""
    download: bool = True
    """Fetch MNIST when the raw files are missing (false: fail with a message instead)."""
    verify: bool = True
    """Check the sha256 of the four raw files (false only for your own IDX files)."""
    global_batch_size: int = 64
    """Training samples per optimizer step, summed over all ranks; must divide by the world size."""
    test_batch_size: int = 1000
    """Evaluation batch per rank; changes speed and memory, never the result."""
    train_limit: int | None = None
    """Train on the first N training samples (null: all 60000)."""


@dataclass
class ModelConfig:
    dropout: float = 0.5
    """Probability of both dropout layers (0 turns both off)."""


@dataclass
class OptimConfig:
    lr: float = 0.01
    """SGD learning rate."""
    momentum: float = 0.5
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum (torch.optim.SGD's nesterov; Sutskever et al. 2013); needs optim.momentum > 0."""
    weight_decay: float = 0.0
    """L2 penalty added to every gradient, as torch.optim.SGD's weight_decay (0: none)."""
    schedule: Literal["constant", "onecycle"] = "constant"
    """The learning rate of each step (job/schedule.py): constant = optim.lr throughout; onecycle = a
    linear rise to optim.lr over the first optim.warmup of all steps, then a linear fall towards 0 at
    the last step (Smith and Topin 2019, "Super-Convergence", the linear one-cycle policy)."""
    warmup: float = 0.2
    """onecycle: the fraction of all steps (train.epochs x steps per epoch) spent rising to optim.lr."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over the training set."""
    log_interval: int = 10
    """Log the training loss every N optimizer steps."""
    resume: str = "auto"
    """auto: continue from the run directory's newest valid checkpoint | never | a checkpoint file to start from."""


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    """Also checkpoint every N optimizer steps inside an epoch (0: only at epoch ends)."""
    keep: int = 3
    """Keep the newest N checkpoints; older ones are deleted once a newer one is safely written."""


@dataclass
class RunConfig:
    name: str = "default"
    """Name of the run; the run directory defaults to runs/<name>."""
    dir: str | None = None
    """Run directory (null: runs/<name>); only rank 0 writes here."""
    lock_wait_s: int = 120
    """Seconds to wait for the run directory's lock while a job on another host (or an earlier boot)
    holds it, then exit 1; outlasts a dead host's NFS lock lease (90 s by default)."""


@dataclass
class DistConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: the GPU numbered LOCAL_RANK when CUDA is usable (and the backend is not gloo), else the CPU;
    cuda: GPUs or exit 2 naming why not; cpu: the CPU even where GPUs are."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: auto = nccl on GPUs, gloo on the CPU; gloo with dist.device=cuda lets ranks share a GPU."""
    timeout_s: int = 600
    """Seconds a collective may wait for a peer before the job fails."""


@dataclass
class SpeedConfig:
    bf16: bool = False
    """bfloat16 autocast for the forward pass (weights, gradients and optimizer stay fp32); changes the bits."""
    channels_last: bool = False
    """Convolutions in channels-last memory layout (the layout GPU tensor cores want); changes the bits."""
    compile: bool = False
    """torch.compile the forward pass and loss for the full rank batch (needs a C++ compiler); an epoch's
    partial last batch runs eagerly (no recompile in the loop); the compile time is logged apart and kept
    out of samples/s; changes the bits."""
    tf32: bool = False
    """TF32 (10-bit mantissa) for CUDA matmuls and cuDNN convolutions on Ampere and later; changes the bits."""
    data_on_device: bool = True
    """Keep the whole dataset in the training device's memory (about 220 MB per rank on a GPU): batches are
    gathered there, no host-to-device copy per step (from pageable memory, where `non_blocking` does not
    overlap). On by default: on CUDA the bits equal those of `false` (make gpu-check's speed.data_on_device),
    on CPU it changes nothing. `false` gathers each batch on the host and copies it."""
    native_cpu_kernels: bool = False
    """Let torch pick the CPU kernels' instruction set (AVX-512 where present) instead of AVX2 on every x86
    host (job/cpu_kernels.py); faster on some hosts, changes the bits between hosts."""


@dataclass
class TrackingConfig:
    mlflow: bool = False
    """Mirror the run to an MLflow tracking server: params, tags, metrics.jsonl's figures, the results
    (rank 0 alone; needs the `tracking` extra; docs/TRACKING.md)."""
    uri: str | None = None
    """The MLflow tracking URI (http(s)://host:port, sqlite:///file.db, a folder); null: $MLFLOW_TRACKING_URI."""
    experiment: str = "mnist-ddp"
    """The MLflow experiment the run goes into (created when missing)."""
    run_name: str | None = None
    """The MLflow run's name (null: run.name); a run directory stays one MLflow run across restarts."""


@dataclass
class Config:
    seed: int = 1
    """One seed from which every random stream is derived."""
    deterministic: bool = True
    """Deterministic kernels (cuDNN deterministic, no benchmarking): same config, same bits."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir is not None else Path("runs") / self.run.name


def _between(low: float, high: float) -> typing.Callable[[Any], bool]:
    return lambda v: low <= v <= high


RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
"""A run name is a plain directory name: it cannot climb out of runs/ (`..`) or hide (`.x`)."""

# key -> (check, what the value must be). Checked after types, so each check sees its type, and
# every number must be finite (NaN fails every comparison; infinity fails the upper bounds).
# The bounds are docs/CONFIG.md's ranges; upper ones keep a typo from meaning a
# week-long run or a huge allocation.
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "seed": (lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
    "data.root": (lambda v: v != "", "a non-empty path"),
    "data.global_batch_size": (_between(1, MNIST_TRAIN_SIZE), f"between 1 and {MNIST_TRAIN_SIZE}"),
    "data.test_batch_size": (_between(1, 10_000), "between 1 and 10000 (the test set's size)"),
    "data.train_limit": (
        lambda v: v is None or 1 <= v <= MNIST_TRAIN_SIZE,
        f"null or between 1 and {MNIST_TRAIN_SIZE}",
    ),
    "model.dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "optim.lr": (lambda v: 0.0 < v <= 10.0, "in (0, 10]"),
    "optim.momentum": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "optim.weight_decay": (_between(0.0, 1.0), "in [0, 1]"),
    "optim.warmup": (lambda v: 0.0 <= v < 1.0, "in [0, 1) (a fraction of all steps)"),
    "train.epochs": (_between(1, 10_000), "between 1 and 10000"),
    "train.log_interval": (_between(1, 1_000_000), "between 1 and 1000000"),
    "train.resume": (lambda v: v != "", "auto, never or a checkpoint path"),
    "checkpoint.every_steps": (_between(0, 1_000_000), "between 0 (only at epoch ends) and 1000000"),
    "checkpoint.keep": (_between(1, 1000), "between 1 and 1000"),
    "run.name": (
        lambda v: RUN_NAME.fullmatch(v) is not None,
        "a plain name: letters, digits, '.', '_', '-', not starting with '.'",
    ),
    "run.dir": (lambda v: v is None or v != "", "null or a non-empty path"),
    "run.lock_wait_s": (_between(0, 7 * 24 * 3600), "between 0 (no wait) and 604800 (a week)"),
    "dist.timeout_s": (_between(1, 7 * 24 * 3600), "between 1 and 604800 (a week)"),
    "tracking.uri": (lambda v: v is None or v.strip() != "", "null ($MLFLOW_TRACKING_URI) or a tracking URI"),
    "tracking.experiment": (lambda v: v.strip() != "", "a non-empty experiment name"),
    "tracking.run_name": (lambda v: v is None or v.strip() != "", "null (run.name) or a non-empty name"),
}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config from a YAML file (default.yaml when None) with KEY=VALUE overrides applied."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    tree = _read_yaml(path)
    sources = {}
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(tree, key, value)
        sources[key] = f"override {_cut(override)}"
    return config_from_dict(tree, source=str(path), sources=sources)


PATH_KEYS = ("data.root", "run.dir", "train.resume")
"""Keys that hold a path. A leading `~` is expanded to the home directory, as a shell would (a
path in a YAML file or a quoted override never meets a shell); environment variables are not."""


def expand_path(path: str) -> str:
    """`path` with a leading `~` or `~user` expanded; unchanged otherwise (auto and never too)."""
    return os.path.expanduser(path)


def config_from_dict(tree: dict[str, Any], source: str = "config", sources: dict[str, str] | None = None) -> Config:
    """A validated Config from a nested dict; unknown keys, wrong types and bad ranges raise
    ConfigError naming the key and where it came from: `sources` maps the dotted keys that
    overrides set to the override, every other key is from `source`."""
    cfg = _build(Config, tree, prefix="", source=source, sources=sources or {})
    for key in PATH_KEYS:
        value = get_dotted(cfg, key)
        if isinstance(value, str):
            *parents, leaf = key.split(".")
            setattr(get_dotted(cfg, ".".join(parents)) if parents else cfg, leaf, expand_path(value))
    for key, (ok, expected) in _RANGES.items():
        value = get_dotted(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={show(value)} is out of range: must be {expected}")
    if cfg.optim.nesterov and cfg.optim.momentum == 0:  # torch.optim.SGD refuses it at the first step
        raise ConfigError(
            "optim.nesterov=true needs momentum: set optim.momentum > 0 (e.g. 0.9) or optim.nesterov=false"
        )
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, run.dir filled in: what was actually run."""
    tree = config_to_dict(cfg)
    tree["run"]["dir"] = str(cfg.run_dir)
    return yaml.safe_dump(tree, sort_keys=False)


def rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """The per-rank share of the global batch; it must split evenly, or W ranks would not walk
    the same global batches as one process."""
    if global_batch_size % world_size:
        lower = global_batch_size - global_batch_size % world_size
        hint = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
        raise ConfigError(
            f"data.global_batch_size={global_batch_size} does not split evenly across {world_size} ranks; "
            f"use a multiple of {world_size} (e.g. {hint}) or another number of processes"
        )
    return global_batch_size // world_size


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as people write them: PyYAML follows YAML 1.1, where a
    float needs a dot and a signed exponent, so `1e-3`, `5E-3` and `1e4` would be strings. YAML 1.2
    (its core schema) reads them as floats; this adds that form and leaves every other resolution
    as it was."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _WrittenInt(int):
    """An integer that remembers how it was written, for keys that hold text (run.name=007)."""

    yaml_text: str


class _WrittenFloat(float):
    """A float that remembers how it was written, for keys that hold text (run.name=1e3, 1.10)."""

    yaml_text: str


def _keeping_text(construct: typing.Callable[..., Any], kind: type) -> typing.Callable[..., Any]:
    def constructor(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        value = kind(construct(loader, node))
        value.yaml_text = node.value
        return value

    return constructor


_Loader.add_constructor("tag:yaml.org,2002:int", _keeping_text(yaml.SafeLoader.construct_yaml_int, _WrittenInt))
_Loader.add_constructor("tag:yaml.org,2002:float", _keeping_text(yaml.SafeLoader.construct_yaml_float, _WrittenFloat))


def parse_yaml(text: str) -> Any:
    """YAML text as Python values (safe: plain data only), with YAML 1.2's exponent numbers."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)


def _read_yaml(path: Path) -> dict[str, Any]:
    raw = read_regular(path, "config file", "pass --config with an existing YAML file", error=ConfigError)
    try:
        tree = parse_yaml(raw.decode())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}: YAML syntax error{where}: {e.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"config file {path} cannot be read as YAML: {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(tree).__name__}")
    return tree


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {_cut(text)!r} is not KEY=VALUE (example: optim.lr=0.02)")
    try:
        value = parse_yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced quote): take it as the plain string it is
    return key.strip(), value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    node[leaf] = value


SHOWN_CHARACTERS = 60
"""The most of a value a message quotes: enough to recognise it, bounded whatever the input
(nine levels of YAML aliases expand a 376-byte file into 9**9 items)."""


def show(value: Any) -> str:
    """A config value as it is written in YAML (null, true, 0.02, 'a string'), for messages;
    a list or mapping by its kind and size only, never expanded; at most SHOWN_CHARACTERS."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    if isinstance(value, str):
        return "'" + _cut(value).replace("'", "''") + "'"  # YAML's single-quoted style
    if isinstance(value, (int, float)):
        return _cut(str(value))
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"a mapping of {len(value)} key(s)"
    return f"a {type(value).__name__}"


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARACTERS else text[: SHOWN_CHARACTERS - 3] + "..."


def get_dotted(cfg: Any, key: str) -> Any:
    """The value of a dotted key ("optim.lr") in a Config."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _build(cls: type, tree: Any, prefix: str, source: str, sources: dict[str, str]) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must be a section of keys, not {show(tree)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in tree:
        if key not in names:
            dotted = prefix + (_cut(key) if isinstance(key, str) else show(key))
            close = difflib.get_close_matches(str(key), names, n=1) if isinstance(key, str) else []
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            origin = next((text for k, text in sources.items() if k == dotted or k.startswith(dotted + ".")), source)
            raise ConfigError(
                f"unknown config key {dotted} in {origin}{hint}; valid keys in {where}: {', '.join(names)}"
            )
    values = {}
    for name in names:
        if name not in tree:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, tree[name], f"{prefix}{name}.", source, sources)
        else:
            values[name] = _coerce(f"{prefix}{name}", hint, tree[name])
    return cls(**values)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """value checked against the field's type; ints are accepted where floats are expected, whole
    floats (1e4) where ints are, and numbers as written where text is (run.name=1e3)."""
    written = getattr(value, "yaml_text", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = int(value) if isinstance(value, int) else float(value)  # plain again: yaml dumps no subclass
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}={show(value)} is not allowed: choose one of {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 1e4 (a float in YAML) for a count: only a whole number
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return written or str(value)  # a run name like 007 or a path like 2024 reads as a number in YAML
    if type(value) is hint:
        return value
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]
    raise ConfigError(f"{key}={show(value)} has the wrong type: expected {expected}")
