"""Config: the seed recipe as defaults, YAML + overrides into typed fields, every validation error."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from helpers import REPO, assert_one_line_error, run_job, run_main

from job.config import DEFAULT_CONFIG, Config, config_from_dict, config_to_dict, dump_config, load_config
from job.errors import ConfigError
from job.run_dir import RunDir


def test_defaults_are_the_seed_recipe():
    cfg = load_config()
    assert cfg.seed == 1
    assert cfg.deterministic is True
    assert (cfg.data.global_batch_size, cfg.data.test_batch_size, cfg.data.train_limit) == (64, 1000, None)
    assert cfg.data.download is True and cfg.data.verify is True
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.01, 0.5)
    assert cfg.model.dropout == 0.5
    assert (cfg.train.epochs, cfg.train.log_interval) == (3, 10)
    assert cfg.dist.backend == "auto"
    assert cfg.run_dir == Path("runs/default")


def test_default_yaml_spells_out_every_key_at_its_dataclass_default():
    """default.yaml is the seed recipe exactly: the same values as the dataclasses, every key present."""
    import yaml

    written = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert written == config_to_dict(Config())


def test_overrides_are_typed():
    cfg = load_config(
        overrides=["optim.lr=0.02", "train.epochs=5", "data.download=false", "data.train_limit=100", "optim.momentum=0"]
    )
    assert cfg.optim.lr == 0.02
    assert cfg.train.epochs == 5
    assert cfg.data.download is False
    assert cfg.data.train_limit == 100
    assert cfg.optim.momentum == 0.0 and isinstance(cfg.optim.momentum, float)
    assert load_config(overrides=["data.train_limit=null"]).data.train_limit is None
    assert load_config(overrides=["run.name=2024"]).run.name == "2024"


def test_yaml_file_and_overrides_combine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\noptim:\n  lr: 0.1\n")
    cfg = load_config(path, ["optim.lr=0.5"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.optim.momentum) == (7, 0.5, 0.5)


def test_smoke_config_loads():
    cfg = load_config(REPO / "job/configs/smoke.yaml")
    assert cfg.train.epochs == 1 and cfg.data.train_limit == 5000


def test_dump_is_loadable_and_resolves_run_dir(tmp_path):
    cfg = load_config(overrides=["run.name=abc"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again.run.dir == "runs/abc"
    assert dataclasses.replace(again, run=cfg.run) == cfg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=0.1", "unknown config key optim.lrr"),
        ("optimizer.lr=0.1", "unknown config key optimizer"),
        ("epochs=3", "unknown config key epochs"),
        ("train.epochs=three", "wrong type: expected an integer"),
        ("train.epochs=2.5", "wrong type: expected an integer"),
        ("train.epochs=true", "wrong type: expected an integer"),
        ("optim.lr=fast", "wrong type: expected a number"),
        ("data.download=yes please", "wrong type: expected true or false"),
        ("data.download=1", "wrong type: expected true or false"),
        ("dist.backend=mpi", "choose one of auto, gloo, nccl"),
        ("optim.lr=0", "optim.lr=0.0 is out of range"),
        ("optim.lr=-1", "out of range"),
        ("optim.momentum=1", "optim.momentum=1.0 is out of range"),
        ("model.dropout=1.0", "model.dropout=1.0 is out of range"),
        ("model.dropout=-0.1", "out of range"),
        ("train.epochs=0", "train.epochs=0 is out of range"),
        ("train.log_interval=0", "out of range"),
        ("data.global_batch_size=0", "out of range"),
        ("data.test_batch_size=-5", "out of range"),
        ("data.train_limit=0", "out of range"),
        ("data.train_limit=60001", "out of range"),
        ("dist.timeout_s=0", "out of range"),
        ("seed=-1", "seed=-1 is out of range"),
        ("run.name=a/b", "run.name='a/b' is out of range"),
        ("data.root=", "data.root='' is out of range"),
        ("optim=3", "optim must be a section"),
        ("seed.value=1", "seed is a value, not a section"),
        ("nonsense", "is not KEY=VALUE"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(overrides=[override])


def test_unknown_key_suggests_and_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["optim.lrr=0.1"])
    message = str(info.value)
    assert "did you mean optim.lr?" in message
    assert "valid keys in optim: lr, momentum" in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\ntrain:\n  epochs: [3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line \d+, column \d+"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


def test_empty_config_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "optim.lr=-1"], "optim.lr=-1.0 is out of range"),
        (["train", "optim.lrr=0.1"], "unknown config key optim.lrr"),
        (["train", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["evaluate", "train.epochs=1"], "--checkpoint"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capfd, args, needle):
    result = run_main(capfd, args, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, needle)
    assert list(tmp_path.iterdir()) == [], "bad input must not create files"


@pytest.mark.processes
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),  # argparse's exit
        (["train", "optim.lrr=0.1"], "unknown config key optim.lrr"),  # the job's own error
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2_from_a_real_process(tmp_path, args, needle):
    """The process boundary the in-process tests stand in for: `python -m job` ends through
    job.process_exit with exit 2, one line on stderr, no traceback, nothing written."""
    result = run_job(args, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, needle)
    assert list(tmp_path.iterdir()) == [], "bad input must not create files"


def test_cli_yaml_syntax_error_is_one_line(tmp_path, capfd):
    (tmp_path / "bad.yaml").write_text("train: {epochs: 3\n")
    result = run_main(capfd, ["train", "--config", "bad.yaml"], cwd=tmp_path)
    assert_one_line_error(result, "YAML syntax error at line")


def test_cli_config_prints_the_resolved_config(tmp_path, capfd):
    result = run_main(capfd, ["config", "optim.lr=0.05"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lr: 0.05" in result.stdout and "dir: runs/default" in result.stdout


CONFIG_REFERENCE = REPO / "docs" / "CONFIG.md"


def dataclass_keys(cls: type = Config, prefix: str = "") -> dict[str, tuple[object, tuple[object, ...]]]:
    """Every dotted key of the config dataclasses: its default and, for a Literal type, its choices."""
    import typing

    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(dataclass_keys(hints[f.name], f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else ()
        found[f"{prefix}{f.name}"] = (default, choices)
    return found


def reference_rows(markdown: str) -> dict[str, list[str]]:
    """key -> its row's cells (default, range, meaning) in the "Every key" table of docs/CONFIG.md."""
    section = markdown.split("\n## Every key\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def reference_problems(keys: dict[str, tuple[object, tuple[object, ...]]], markdown: str) -> list[str]:
    """What the reference gets wrong about `keys` (dataclass_keys' form), one line each."""
    import yaml

    rows = reference_rows(markdown)
    problems = [f"{key}: in the dataclasses, not in docs/CONFIG.md" for key in keys if key not in rows]
    problems += [f"{key}: in docs/CONFIG.md, not in the dataclasses" for key in rows if key not in keys]
    for key, (default, choices) in keys.items():
        if key not in rows:
            continue
        written, _, meaning = rows[key]
        shown = yaml.safe_load(written.strip("`"))
        if shown != default or type(shown) is not type(default):
            problems.append(f"{key}: docs/CONFIG.md says the default is {written}, the dataclass {default!r}")
        problems += [f"{key}: the choice `{c}` is not in its meaning" for c in choices if f"`{c}`" not in meaning]
    return problems


def test_the_configuration_reference_lists_every_key_with_its_default():
    """docs/CONFIG.md's table and the dataclasses hold the same keys, at the same defaults (which
    test_default_yaml_spells_out_every_key_at_its_dataclass_default ties to default.yaml)."""
    problems = reference_problems(dataclass_keys(), CONFIG_REFERENCE.read_text())
    assert not problems, "\n".join(problems)


def test_the_reference_check_sees_a_key_missing_a_stale_row_and_a_wrong_default():
    keys = dataclass_keys()
    keys["train.warmup_steps"] = (0, ())  # a key added to the dataclasses, not documented
    keys["optim.lr"] = (0.02, ())  # a default changed in the dataclasses only
    del keys["seed"]  # a key removed from the dataclasses, its row left behind
    keys["dist.backend"] = ("auto", ("auto", "gloo", "nccl", "mpi"))  # a choice added, not described
    assert reference_problems(keys, CONFIG_REFERENCE.read_text()) == [
        "train.warmup_steps: in the dataclasses, not in docs/CONFIG.md",
        "seed: in docs/CONFIG.md, not in the dataclasses",
        "optim.lr: docs/CONFIG.md says the default is `0.01`, the dataclass 0.02",
        "dist.backend: the choice `mpi` is not in its meaning",
    ]


def test_global_batch_splits_evenly_or_is_refused():
    from job.config import rank_batch_size

    assert [rank_batch_size(64, w) for w in (1, 2, 4, 8)] == [64, 32, 16, 8]
    with pytest.raises(ConfigError, match=r"across 3 ranks; use a multiple of 3 \(e.g. 63 or 66\)"):
        rank_batch_size(64, 3)
    with pytest.raises(ConfigError, match=r"use a multiple of 4 \(e.g. 4\)"):
        rank_batch_size(2, 4)


def test_cli_config_checks_the_batch_split_for_a_world_size(tmp_path, capfd):
    assert_one_line_error(run_main(capfd, ["config", "--world-size", "3"], cwd=tmp_path), "does not split evenly")
    assert run_main(capfd, ["config", "--world-size", "4"], cwd=tmp_path).returncode == 0


def test_a_typo_in_an_override_is_blamed_on_the_override_not_the_file():
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr in override optim\.lrr=0\.1 \(did you mean"):
        load_config(overrides=["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr in .*default\.yaml"):
        config_from_dict({"optim": {"lrr": 0.1}}, source=str(DEFAULT_CONFIG))


def test_values_in_messages_are_spelt_as_in_yaml():
    """A user types null, true and 0.02, never Python's None and True."""
    with pytest.raises(ConfigError, match=r"run\.name=null has the wrong type"):
        load_config(overrides=["run.name=null"])
    with pytest.raises(ConfigError, match=r"data\.train_limit=true has the wrong type"):
        load_config(overrides=["data.train_limit=true"])


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("optim.lr=1e-3", "optim.lr", 0.001),
        ("optim.lr=5E-3", "optim.lr", 0.005),
        ("optim.lr=1.0e-2", "optim.lr", 0.01),
        ("optim.momentum=.5e0", "optim.momentum", 0.5),
        ("data.train_limit=1e4", "data.train_limit", 10_000),
        ("data.global_batch_size=6.4e1", "data.global_batch_size", 64),
        ("run.name=1e3", "run.name", "1e3"),  # a name stays as written, not 1000.0
        ("run.name=007", "run.name", "007"),
        ("run.name=1.10", "run.name", "1.10"),
    ],
)
def test_numbers_are_read_as_people_write_them(override, key, value):
    """PyYAML reads YAML 1.1, where 1e-3 is a string; the config reads YAML 1.2's numbers."""
    cfg = load_config(overrides=[override])
    *sections, leaf = key.split(".")
    node = cfg
    for section in sections:
        node = getattr(node, section)
    assert getattr(node, leaf) == value and type(getattr(node, leaf)) is type(value)


def test_exponent_numbers_in_a_config_file_and_a_runs_config_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  lr: 5e-3\ndata:\n  train_limit: 1e4\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.data.train_limit) == (0.005, 10_000)
    resolved = RunDir(tmp_path).config  # what a run directory holds, read again by plot
    resolved.write_text(dump_config(load_config(overrides=["optim.lr=1e-5"])))
    assert load_config(resolved).optim.lr == 1e-5


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.train_limit=1.5e0", "wrong type: expected an integer"),  # not a whole number
        ("train.epochs=2.5e0", "wrong type: expected an integer"),
        ("optim.lr=1e", "wrong type: expected a number"),
        ("optim.lr=e-3", "wrong type: expected a number"),
        ("optim.lr=1e-3x", "wrong type: expected a number"),
        ("seed=1e30", "out of range"),
    ],
)
def test_what_is_not_a_number_of_the_keys_kind_is_still_refused(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=[override])
