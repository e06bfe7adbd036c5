"""`python -m job <command>`: train | evaluate | predict | plot | export | data | config.

Bad input never shows a traceback: it is one line on stderr and a non-zero exit code
(2 for bad input; job/errors.py lists the others).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence

from job.config import DataConfig, dump_config, expand_path, load_config, rank_batch_size
from job.console import setup_logging
from job.cpu_kernels import pin_cpu_kernels
from job.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, ConfigError, JobError, PreemptedError
from job.export import FORMATS
from job.launcher_watch import stop_when_the_launcher_dies
from job.process_exit import exit_now, keep_until_exit


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        self.exit(EXIT_BAD_INPUT, f"error: {message}; see `{self.prog} --help`\n")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=expand_path, help="YAML config file (default: job/configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=0.02")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m job", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train the model (under torchrun/accelerate: one rank)")
    _add_config_args(train)
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="print exact test figures of a model as one JSON line")
    evaluate.add_argument("--checkpoint", type=expand_path, required=True, help="model.pt or a checkpoint file")
    _add_config_args(evaluate)
    evaluate.set_defaults(func=_evaluate)

    predict = commands.add_parser("predict", help="read the digit in each image file (PNG, JPEG; any size)")
    weights = predict.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", type=expand_path, help="model.pt or a checkpoint file")
    weights.add_argument("--model", type=expand_path, help="an onnx file (export --format onnx), run by onnxruntime")
    predict.add_argument("--json", action="store_true", help="one JSON object per line, with all 10 probabilities")
    predict.add_argument("images", type=expand_path, nargs="+", metavar="IMAGE", help="image files, one digit each")
    predict.set_defaults(func=_predict)

    plot = commands.add_parser(
        "plot", help="draw a run's figures into RUN_DIR/plots/ (digits, training curve, confusions)"
    )
    plot.add_argument("run_dir", type=expand_path, metavar="RUN_DIR", help="a run directory, e.g. runs/default")
    plot.add_argument("--data-root", type=expand_path, help="MNIST data directory (default: the run's data.root)")
    plot.set_defaults(func=_plot)

    export = commands.add_parser(
        "export", help="write a model as safetensors, ONNX or a torch.export program, for use elsewhere"
    )
    export.add_argument("--checkpoint", type=expand_path, required=True, help="model.pt or a checkpoint file")
    export.add_argument("--format", required=True, choices=tuple(FORMATS), help="file format")
    export.add_argument("--out", type=expand_path, required=True, help="file to write (replaced if it exists)")
    export.set_defaults(func=_export)

    fetch = commands.add_parser("data", help="fetch and verify MNIST")
    fetch.add_argument("--root", type=expand_path, help="data directory (default: data.root of the default config)")
    fetch.set_defaults(func=_data)

    show = commands.add_parser("config", help="validate a config and print it resolved, as YAML")
    show.add_argument("--world-size", type=int, default=1, help="also check that the batch splits over N ranks")
    _add_config_args(show)
    show.set_defaults(func=_config)
    return parser


# Commands that need torch import it when they run: `config` and bad input answer fast, and the
# CPU kernels are pinned before torch loads them (job/cpu_kernels.py).
def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    pin_cpu_kernels(native=cfg.speed.native_cpu_kernels)
    from job.train import run_training

    run_training(cfg)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    pin_cpu_kernels(native=cfg.speed.native_cpu_kernels)
    from job.train import run_evaluation

    result = run_evaluation(cfg, args.checkpoint)
    if _env_int("RANK") == 0:
        print(json.dumps(result), flush=True)
    return 0


def _predict(args: argparse.Namespace) -> int:
    pin_cpu_kernels(native=False)
    from job.predict import run_predict

    failed = run_predict(args.images, as_json=args.json, checkpoint=args.checkpoint, model=args.model)
    return EXIT_BAD_INPUT if failed else 0


def _plot(args: argparse.Namespace) -> int:
    pin_cpu_kernels(native=False)
    from job.plot import run_plot

    for path in run_plot(args.run_dir, args.data_root):
        print(f"wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    pin_cpu_kernels(native=False)
    from job.export import run_export

    print(f"wrote {run_export(args.checkpoint, args.format, args.out)}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from job.data import ensure_mnist, raw_dir

    root = args.root or DataConfig().root
    ensure_mnist(root, download=True, verify=True)
    print(f"MNIST ready and verified in {raw_dir(root)}")
    return 0


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.world_size < 1:
        raise ConfigError(f"--world-size={args.world_size} must be >= 1")
    rank_batch_size(cfg.data.global_batch_size, args.world_size)
    print(dump_config(cfg), end="")
    return 0


def _env_int(name: str, default: int = 0) -> int:
    """A launcher variable read before any validation (which may be what failed)."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def main(argv: Sequence[str] | None = None, as_program: bool = False) -> int:
    """The CLI; returns the exit code. `as_program`: this process exits with it (late Ctrl-Cs are ignored)."""
    args = build_parser().parse_args(argv)
    exiting = _ignore_ctrl_c if as_program else lambda: None
    setup_logging(_env_int("RANK"), _env_int("WORLD_SIZE", 1))
    stop_when_the_launcher_dies()
    try:
        return args.func(args)
    except JobError as e:
        exiting()
        keep_until_exit(e)  # its traceback holds the DDP model: freed here, it could hang the exit
        # Most errors are the same on every rank: the first process on each host says it once.
        if not e.quiet and (e.rank_specific or _env_int("LOCAL_RANK") == 0):
            _say("stopped" if isinstance(e, PreemptedError) else "error", str(e))
        elif not e.quiet and e.exit_code == EXIT_BAD_INPUT:
            _wait_for_the_rank_that_says_it()
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C outside training, or a second one during it
        exiting()
        keep_until_exit(e)
        if _env_int("LOCAL_RANK") == 0:
            _say("interrupted", "Ctrl-C; run the same command again to resume from the newest checkpoint, if any")
        return EXIT_INTERRUPTED
    finally:
        exiting()


SPEAKER_WAIT_S = 10.0


def _wait_for_the_rank_that_says_it() -> None:
    """A silent rank of bad input that every rank sees waits, up to SPEAKER_WAIT_S, for its host's
    first process to print the line and exit: the launcher then stops this rank with SIGTERM.

    Exiting at once (os._exit takes milliseconds) let the launcher see a silent rank fail first and
    SIGTERM local rank 0 before its print: a 3-rank torchrun run with an uneven global batch ended
    with exit 2 and no line at all, in CI and here 1 run in 1. SIGTERM is blocked and awaited, so
    this rank still exits with 2, not by the signal. Costs nothing when local rank 0 exits (the
    launcher's SIGTERM follows within its monitor interval); the bound keeps "within seconds"
    when it never does."""
    if _env_int("WORLD_SIZE", 1) <= 1:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigtimedwait({signal.SIGTERM}, SPEAKER_WAIT_S)


def _ignore_ctrl_c() -> None:
    """Once the outcome is decided there is nothing left to stop: a late Ctrl-C (a second or third
    press while the process exits) would only raise KeyboardInterrupt inside the last line's print
    or the interpreter's shutdown ("Exception ignored in: <module 'threading'>")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _say(kind: str, message: str) -> None:
    tag = f"[rank {_env_int('RANK')}] " if _env_int("WORLD_SIZE", 1) > 1 else ""
    print(f"{tag}{kind}: {message}", file=sys.stderr, flush=True)


def exit_code(argv: Sequence[str] | None = None, as_program: bool = False) -> int:
    """main()'s exit code, argparse's own exits included: the code `python -m job ARGV` exits with
    (tests call it in their process for messages and checks that fail before a process group starts)."""
    try:
        return main(argv, as_program)
    except SystemExit as e:  # argparse (--help, a usage error) has printed its message
        return e.code if isinstance(e.code, int) else int(e.code is not None)


def _run_and_exit() -> None:
    """main(), then exit_now with its code on every path, a bug's traceback included."""
    try:
        code = exit_code(as_program=True)
    except BaseException as e:  # a bug: its traceback as Python prints it, then the same exit
        keep_until_exit(e)
        traceback.print_exc()
        code = 1
    exit_now(code)


if __name__ == "__main__":
    _run_and_exit()
