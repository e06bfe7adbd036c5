"""`make gpu-check`: does the job work on this CUDA host? One prepared script: no network, no installs.

    python3 tests/tools/gpu_check.py [--data DIR | --synthetic] [--out DIR] [--deadline 480] [--allow-cpu]

It runs the job from this working tree (`python -m job ...`, PYTHONPATH = the repository) with
the python that runs it: the project's .venv, or a host's own python and torch (the lent GPU
machine's). This script needs only the standard library and torch; what the job itself imports
is checked by the first step. Steps, in order (* = CUDA only):

  environment      versions (torch, CUDA, driver, NCCL, cuDNN, Python), the GPU, compilers, Python.h,
                   /dev/shm, what torch.compile lacks here, and that the job imports
  data             MNIST from --data (the four raw IDX files or their .gz), sha256-checked
  net              the job's net, forward + backward twice each in fp32, bf16 autocast, channels_last
  tf32-off *       the fp32 net on CUDA agrees with the CPU to 1e-4 (TF32 would not)
  smoke            the smoke config twice at W=1: bit-identical; on the device (cuda, backend nccl)
  resume           from a mid-run checkpoint of that run: the same bits
  evaluate         `python -m job evaluate` of its model.pt equals training's figures
  sigterm          SIGTERM mid-epoch: exit 75; the same command again ends with the uninterrupted bits
  speed.*          each switch trains on the device and learns; data_on_device=false (the host path; the
                   default is true) gives the default's bits
                   (speed.tf32 is CUDA only)
  shared-gpu *     2 ranks on one GPU over gloo (NCCL takes one GPU per rank): a resume, the same bits
  accelerate       `accelerate launch` with job/configs/accelerate/multi-gpu.yaml (CPU: cpu.yaml)
  bench *          tests/tools/bench.py --gpu, its table in OUT/bench-gpu.md: samples/s and the median
                   step eager and with each switch, two runs' bits compared, and the time to 99% test
                   accuracy of the fast preset beside the seed recipe

Without CUDA it fails at once, unless --allow-cpu: then every step that can runs on the CPU and
the CUDA-only ones are reported skipped, not passed (CI runs this mode). A step starts only if
the --deadline leaves it the time it needs ("skipped: deadline"), and a run that would pass the
deadline is killed. Without --data it uses data/ when that holds MNIST, else generated digits
(--synthetic forces these: a check of the code paths, whose accuracies mean nothing).
Writes OUT/gpu-check.md and OUT/gpu-check.json, each run's log under OUT/logs/.
Exit status 0 only when no step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from job.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[2]
# The job from this working tree, imported here as the runs import it: a GPU host's own python
# has no .venv with the project installed (measured on the lent H200: "No module named 'job'").
sys.path.insert(0, str(ROOT))
SMOKE = "job/configs/smoke.yaml"
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LEARNED = 0.25
"""Test accuracy above which a run has learned: chance is 0.1, the smoke run (79 steps) reaches about 0.43
on MNIST and 1.0 on the generated digits."""
FP32_TOLERANCE = 1e-4
"""Largest difference of the net's log-probabilities between CUDA fp32 and the CPU: fp32 rounding
differs by about 1e-6, TF32's 10-bit mantissa by about 1e-3."""
JOB_IMPORTS = {"yaml": "PyYAML", "PIL": "pillow", "tensorboard": "tensorboard"}
"""What `python -m job train` imports besides torch (module: package)."""
SWITCHES = ("bf16", "channels_last", "compile", "tf32", "data_on_device")


class Failed(Exception):
    """A step's check did not hold: the message says which and what was seen."""


class Skipped(Exception):
    """A step that cannot run here (the message says why); not a failure."""


@dataclass
class Step:
    name: str
    proves: str
    needs: tuple[str, ...] = ()
    cuda_only: bool = False
    seconds_needed: float = 20.0
    """What the step takes at least on a GPU host: it is skipped when the deadline leaves less."""
    status: str = "pending"
    detail: str = ""
    seconds: float = 0.0
    ran_on: str = ""
    runs: list[dict] = field(default_factory=list)


@dataclass
class Run:
    """One started process of the job (or a tool) and where its output goes."""

    label: str
    cmd: list[str]
    log: Path
    process: subprocess.Popen
    started: float
    run_dir: Path | None = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="MNIST's four raw IDX files or their .gz (default: data/)")
    parser.add_argument("--synthetic", action="store_true", help="generated digits instead of MNIST")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/gpu-check", help="where the reports go")
    parser.add_argument("--deadline", type=float, default=480, help="seconds; later steps are skipped, not run")
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA: run the CPU steps, skip the rest")
    args = parser.parse_args()
    if args.data and args.synthetic:
        parser.error("--data and --synthetic exclude each other")
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwinds: runs stopped, work removed
    with tempfile.TemporaryDirectory(prefix="mnist-ddp-gpu-check-") as work:
        check = Check(args, Path(work))
        check.run_all()
    report = check.write_reports()
    print("\n" + report)
    return 1 if any(step.status == "failed" for step in check.steps) else 0


class Check:
    """The steps, the state they share (the device, the data, the reference run) and the deadline."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.started = time.monotonic()
        self.started_utc = datetime.datetime.now(datetime.timezone.utc)
        self.cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
        self.device = "cuda" if self.cuda else "cpu"
        self.data_root = work / "data"
        self.verify = True
        self.data_note = ""
        self.environment: dict[str, str] = {}
        self.reference: Path | None = None  # the first smoke run: what later runs must equal
        self.current = Step("none", "")  # the step running, which owns the runs started
        self.started_runs: list[Run] = []
        self.logs = args.out / "logs"
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        self.steps = [
            Step("environment", "versions, GPU, compilers, /dev/shm; CUDA usable; the job imports", seconds_needed=0),
            Step("data", "MNIST as raw IDX or .gz, sha256-verified (or generated digits)", needs=("environment",),
                 seconds_needed=0),
            Step("net", "the net's forward+backward twice each in fp32, bf16, channels_last: identical",
                 needs=("environment",), seconds_needed=10),
            Step("no-nan-fills", "30 SGD steps of the net without torch's NaN fills give the bits they give with them",
                 needs=("environment",), seconds_needed=10),
            Step("tf32-off", f"the fp32 net on CUDA agrees with the CPU within {FP32_TOLERANCE:g} (TF32 is off)",
                 needs=("environment",), cuda_only=True, seconds_needed=10),
            Step("smoke", "the smoke config twice at W=1: bit-identical, on the device (cuda/nccl)",
                 needs=("environment", "data")),
            Step("resume", "resuming a mid-run checkpoint of the smoke run gives its bits", needs=("smoke",)),
            Step("evaluate", "`python -m job evaluate` of model.pt equals training's test figures", needs=("smoke",)),
            Step("sigterm", "SIGTERM mid-epoch exits 75; the rerun ends with the uninterrupted bits",
                 needs=("smoke",), seconds_needed=40),
            *(
                Step(f"speed.{switch}", "trains on the device and learns"
                     + ("; =false (host batches) gives the default's bits" if switch == "data_on_device" else ""),
                     needs=("smoke",), cuda_only=switch == "tf32", seconds_needed=60 if switch == "compile" else 20)
                for switch in SWITCHES
            ),
            Step("shared-gpu", "2 ranks sharing one GPU over gloo: a resume mid-run gives the uninterrupted bits",
                 needs=("environment", "data"), cuda_only=True, seconds_needed=40),
            Step("accelerate", "`accelerate launch` with the repository's config trains on the device",
                 needs=("environment", "data"), seconds_needed=30),
            Step("bench", "tests/tools/bench.py --gpu: every row on CUDA, the job's reruns bit-identical",
                 needs=("environment", "data"), cuda_only=True, seconds_needed=240),
        ]  # fmt: skip

    # --- running the steps ------------------------------------------------------------------------

    def run_all(self) -> None:
        for step in self.steps:
            reason = self.reason_to_skip(step)
            if reason:
                step.status, step.detail = "skipped", reason
            else:
                self.run_step(step)
            print(f"[{self.elapsed():5.0f} s] {step.name:<20} {step.status}: {step.detail}", flush=True)

    def reason_to_skip(self, step: Step) -> str | None:
        if step.cuda_only and not self.cuda:
            return "no CUDA"
        by_name = {s.name: s for s in self.steps}
        not_passed = [f"{name} ({by_name[name].status})" for name in step.needs if by_name[name].status != "passed"]
        if not_passed:
            return f"needs {', '.join(not_passed)}"
        left = self.time_left()
        if step.seconds_needed and left < step.seconds_needed:
            return (
                f"deadline: {left:.0f} s left of --deadline {self.args.deadline:g}, the step needs about "
                f"{step.seconds_needed:.0f} s"
            )
        return None

    def run_step(self, step: Step) -> None:
        self.current = step
        start = time.monotonic()
        try:
            step.detail = getattr(self, "step_" + step.name.replace("-", "_").replace(".", "_"))()
            step.status = "passed"
        except Failed as e:
            step.status, step.detail = "failed", str(e)
        except Skipped as e:
            step.status, step.detail = "skipped", str(e)
        except Exception as e:  # a bug or an environment this script did not foresee: report it, go on
            step.status = "failed"
            step.detail = f"{type(e).__name__}: {e}"
            (self.logs / f"{step.name}.traceback").write_text(traceback.format_exc())
        finally:  # a step that failed early (or Ctrl-C, SIGTERM) leaves no run going: each has its own session
            self.stop_runs()
            step.seconds = time.monotonic() - start

    def stop_runs(self) -> None:
        for run in self.started_runs:
            if run.process.poll() is None:
                kill_tree(run.process.pid)
                run.process.wait()
        self.started_runs.clear()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self) -> float:
        return self.args.deadline - self.elapsed()

    # --- the steps (each returns its detail line or raises Failed / Skipped) ------------------------

    def step_environment(self) -> str:
        self.environment = environment(self.device)
        problems = []
        lacking = [package for module, package in JOB_IMPORTS.items() if importlib.util.find_spec(module) is None]
        if lacking:
            problems.append(f"the job imports {', '.join(lacking)}, which {sys.executable} lacks")
        self.current.ran_on = self.device
        if not self.cuda:
            reason = self.environment.get("CUDA unusable because", "torch sees no GPU")
            if not self.args.allow_cpu:
                problems.append(f"CUDA is not usable: {reason} (--allow-cpu runs the CPU steps alone)")
        if problems:
            raise Failed("; ".join(problems))
        if self.cuda:
            return f"{self.environment['GPU']}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        return f"no CUDA ({self.environment.get('CUDA unusable because', 'torch sees no GPU')}): CPU steps only"

    def step_data(self) -> str:
        raw = self.data_root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        source = self.args.data
        if (
            source is None
            and not self.args.synthetic
            and all((ROOT / "data/MNIST/raw" / n).is_file() for n in RAW_FILES)
        ):
            source = ROOT / "data"
        if source is None:
            write_generated_mnist(raw)
            self.verify = False
            self.data_note = "generated digits"
            return "generated digits (60000 + 10000, MNIST-shaped): accuracies and speeds mean nothing"
        found = [find_data_file(source.expanduser(), name) for name in RAW_FILES]
        for name, path in zip(RAW_FILES, found, strict=True):
            if path is None:
                raise Failed(f"{source} holds no {name} or {name}.gz (looked in it, MNIST/raw/ and raw/)")
            try:
                if path.suffix == ".gz":
                    with gzip.open(path, "rb") as packed, open(raw / name, "wb") as out:
                        shutil.copyfileobj(packed, out)
                else:
                    shutil.copyfile(path, raw / name)
            except (OSError, EOFError) as e:
                raise Failed(f"cannot read {path}: {e}") from None
        from job.data import verify_checksums
        from job.errors import DataError

        try:
            verify_checksums(self.data_root)
        except DataError as e:
            raise Failed(f"not the MNIST release: {str(e).split(';')[0]}") from None
        kinds = sorted({"gz" if p.suffix == ".gz" else "raw IDX" for p in found if p})
        self.data_note = f"MNIST from {source}"
        return f"MNIST from {source} ({', '.join(kinds)}), sha256 verified"

    def step_net(self) -> str:
        from job.seeding import configure_numerics

        configure_numerics(deterministic=True, tf32=False)
        device = torch.device(self.device)
        self.current.ran_on = self.device
        seen = []
        for variant in ("fp32", "bf16", "channels_last"):
            first, second = net_pass(device, variant), net_pass(device, variant)
            if not all(torch.isfinite(t).all() for t in first):
                raise Failed(f"{variant}: the forward or backward pass gave non-finite values")
            if not all(torch.equal(a, b) for a, b in zip(first, second, strict=True)):
                raise Failed(f"{variant}: two passes from the same seed differ (outputs or gradients)")
            seen.append(f"{variant} loss {first[0].item():.4f}")
        return f"on {self.device}, each variant twice, outputs and gradients identical: {', '.join(seen)}"

    def step_no_nan_fills(self) -> str:
        from job.seeding import configure_numerics

        configure_numerics(deterministic=True, tf32=False)
        if torch.utils.deterministic.fill_uninitialized_memory:
            raise Failed("configure_numerics(deterministic=True) left torch's NaN fills of new tensors on")
        device = torch.device(self.device)
        self.current.ran_on = self.device
        with_fills, without = sgd_steps(device, fills=True), sgd_steps(device, fills=False)
        configure_numerics(deterministic=True, tf32=False)
        differ = [i for i, (a, b) in enumerate(zip(with_fills, without, strict=True)) if not torch.equal(a, b)]
        if differ:
            raise Failed(f"weights {differ} differ after {SGD_STEPS} steps with and without the fills")
        return f"on {self.device}, {SGD_STEPS} steps (dropout, SGD momentum 0.5): every weight identical"

    def step_tf32_off(self) -> str:
        from job.model import Net
        from job.seeding import configure_numerics

        configure_numerics(deterministic=True, tf32=False)
        torch.manual_seed(0)
        model = Net().eval()
        images = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            on_cpu = model(images)
            off = (model.cuda()(images.cuda()).cpu() - on_cpu).abs().max().item()
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            on = (model(images.cuda()).cpu() - on_cpu).abs().max().item()
        configure_numerics(deterministic=True, tf32=False)
        self.current.ran_on = "cuda"
        figures = f"largest log-probability difference from the CPU: {off:.1e} with TF32 off, {on:.1e} with it on"
        if off > FP32_TOLERANCE:
            raise Failed(f"{figures}; fp32 should be within {FP32_TOLERANCE:g}")
        return figures

    def step_smoke(self) -> str:
        first, second = (self.start_train(f"smoke-{i}", self.work / f"smoke-{i}") for i in (1, 2))
        a, b = self.finish(first), self.finish(second)
        same_weights(a.run_dir, b.run_dir, "the two smoke runs")
        summary = self.summary(a, world_size=1)
        figures = ("test_loss", "test_accuracy", "correct", "count")
        if any(summary[k] != self.summary(b, world_size=1)[k] for k in figures):
            raise Failed("the two smoke runs' test figures differ")
        self.reference = a.run_dir
        return f"{describe(summary)}; two runs bit-identical"

    def step_resume(self) -> str:
        start, checkpoint = mid_run_checkpoint(self.reference)
        final = self.summary_of(self.reference)["global_step"]
        run = self.finish(self.start_train("resume", self.work / "resume", f"train.resume={checkpoint}"))
        summary = self.summary(run, world_size=1)
        if summary["resumes"] != 1:
            raise Failed(f"summary.json says resumes={summary['resumes']}, expected 1")
        same_weights(run.run_dir, self.reference, "the resumed run and the smoke run")
        return f"resumed at step {start} of {final}; the same bits as the smoke run"

    def step_evaluate(self) -> str:
        cmd = self.job_cmd(
            "evaluate", "--checkpoint", str(run_files(self.reference).model), *self.overrides(self.work / "unused")
        )
        run = self.finish(self.start("evaluate", cmd))
        lines = run.log.read_text().strip().splitlines()
        try:
            figures = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
        except (StopIteration, ValueError):
            raise Failed(f"evaluate printed no JSON line: see {run.log}") from None
        trained = self.summary_of(self.reference)
        differ = [
            f"{k} {figures.get(k)} vs {trained[k]}"
            for k in ("test_loss", "test_accuracy", "correct", "count")
            if figures.get(k) != trained[k]
        ]
        self.current.ran_on = self.device
        if differ:
            raise Failed(f"evaluate differs from training's summary: {'; '.join(differ)}")
        return f"accuracy {figures['test_accuracy']:.4f}, loss {figures['test_loss']:.6f}: equal to training's"

    def step_sigterm(self) -> str:
        # Long enough on a GPU (938 steps) that the signal lands inside the epoch; the CPU's smoke
        # run (79 steps at about 1,500 samples/s) is, and then the smoke run is the reference.
        longer = ("data.train_limit=null",) if self.cuda else ()
        run_dir = self.work / "sigterm"
        stopped = self.start_train("sigterm-1", run_dir, *longer)
        reference = self.start_train("sigterm-reference", self.work / "sigterm-reference", *longer) if longer else None
        newest = self.wait_for_checkpoint(stopped)
        os.killpg(stopped.process.pid, signal.SIGTERM)
        code = self.wait(stopped)
        if code != 75:
            raise Failed(f"exit {code} after SIGTERM, expected 75; see {stopped.log}")
        steps = checkpoint_steps(run_dir)
        if run_files(run_dir).summary.exists():
            raise Failed("the stopped run wrote summary.json: it finished instead of stopping")
        rerun = self.finish(self.start_train("sigterm-2", run_dir, *longer))
        reference_dir = self.finish(reference).run_dir if reference else self.reference
        summary = self.summary(rerun, world_size=1)
        if summary["resumes"] != 1:
            raise Failed(f"the rerun's summary.json says resumes={summary['resumes']}, expected 1")
        same_weights(run_dir, reference_dir, "the stopped-and-rerun run and the uninterrupted one")
        total = self.summary_of(reference_dir)["global_step"]
        if steps[-1] >= total:
            raise Failed(f"the run stopped at its last step ({total}), not inside the epoch: too short here")
        return (
            f"SIGTERM after checkpoint {newest}: stopped at step {steps[-1]} of {total}, exit 75; "
            "the rerun resumed there and ended with the uninterrupted bits"
        )

    def speed_step(self, switch: str) -> str:
        if switch == "compile" and not self.cuda:
            raise Skipped("on the CPU: tests/test_speed.py runs it (minutes on a small CPU); here it runs on CUDA")
        run_dir = self.work / f"speed-{switch}"
        value = "false" if switch == "data_on_device" else "true"  # the one switch on by default
        run = self.start_train(f"speed-{switch}", run_dir, f"speed.{switch}={value}")
        if switch == "compile":
            missing = self.environment.get("torch.compile lacks", "nothing")
            if missing != "nothing":  # the job must refuse in one line, before training
                code = self.wait(run)
                if code != 2 or "speed.compile=true needs" not in run.log.read_text():
                    raise Failed(f"this host lacks {missing}, yet the job did not refuse (exit {code}); see {run.log}")
                raise Skipped(f"this host lacks {missing}; the job refused speed.compile in one line (exit 2)")
        summary = self.summary(self.finish(run), world_size=1)
        if summary["test_accuracy"] <= LEARNED:
            raise Failed(f"test accuracy {summary['test_accuracy']:.4f}: it did not learn (> {LEARNED} expected)")
        same = weights_equal(run_dir, self.reference)
        if switch == "data_on_device" and not same:
            raise Failed("speed.data_on_device=false changed the weights: the switch must only move the data")
        return f"{describe(summary)}; bits {'equal to' if same else 'differ from'} the default run"

    def step_speed_bf16(self) -> str:
        return self.speed_step("bf16")

    def step_speed_channels_last(self) -> str:
        return self.speed_step("channels_last")

    def step_speed_compile(self) -> str:
        return self.speed_step("compile")

    def step_speed_tf32(self) -> str:
        return self.speed_step("tf32")

    def step_speed_data_on_device(self) -> str:
        return self.speed_step("data_on_device")

    def step_shared_gpu(self) -> str:
        shared = ("dist.backend=gloo",)
        reference = self.finish(self.start_train("shared-gpu-1", self.work / "shared-1", *shared, nproc=2))
        summary = self.summary(reference, world_size=2, backend="gloo")
        step, checkpoint = mid_run_checkpoint(reference.run_dir)
        resumed = self.start_train(
            "shared-gpu-2", self.work / "shared-2", *shared, f"train.resume={checkpoint}", nproc=2
        )
        self.summary(self.finish(resumed), world_size=2, backend="gloo")
        same_weights(resumed.run_dir, reference.run_dir, "the resumed 2-rank run and the uninterrupted one")
        return f"{describe(summary)}; resumed at step {step} of {summary['global_step']}: the same bits"

    def step_accelerate(self) -> str:
        if importlib.util.find_spec("accelerate") is None:
            raise Skipped(f"accelerate is not importable by {sys.executable}")
        config = "multi-gpu.yaml" if self.cuda else "cpu.yaml"
        nproc = torch.cuda.device_count() if self.cuda else 2
        run_dir = self.work / "accelerate"
        launch = ["-m", "accelerate.commands.launch", "--config_file", f"job/configs/accelerate/{config}"]
        train = ["-m", "job", "train", "--config", SMOKE, *self.overrides(run_dir)]
        cmd = [sys.executable, *launch, "--num_processes", str(nproc), *train]
        summary = self.summary(self.finish(self.start("accelerate", cmd, run_dir)), world_size=nproc)
        if summary["launcher"] != "accelerate":
            raise Failed(f"summary.json says launcher {summary['launcher']!r}, expected 'accelerate'")
        note = ""
        if nproc == 1:
            same_weights(run_dir, self.reference, "accelerate's 1-process run and the smoke run")
            note = "; the smoke run's bits"
        return f"{config}, {nproc} process(es): {describe(summary)}{note}"

    def step_bench(self) -> str:
        out = self.args.out / "bench-gpu.md"
        out.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(ROOT / "tests/tools/bench.py"),
            "--gpu",
            "--data",
            str(self.data_root),
            "--out",
            str(out),
            *([] if self.verify else ["data.verify=false"]),
        ]
        run = self.start("bench", cmd)
        code = self.wait(run)
        self.current.ran_on = "cuda"
        if code != 0:
            raise Failed(f"bench.py --gpu exit {code}: {last_line(run.log.read_text())}; table in {out}")
        return f"every row on CUDA, the job's two runs bit-identical; table in {out.name}"

    # --- running the job ----------------------------------------------------------------------------

    def overrides(self, run_dir: Path, *extra: str) -> list[str]:
        return [
            f"data.root={self.data_root}",
            "data.download=false",
            f"data.verify={str(self.verify).lower()}",
            f"run.dir={run_dir}",
            f"dist.device={self.device}",
            "checkpoint.every_steps=20",
            "checkpoint.keep=100",
            "dist.timeout_s=60",  # a hung collective fails its step, not the whole deadline
            *extra,
        ]

    def job_cmd(self, *args: str, nproc: int = 1) -> list[str]:
        if nproc == 1:
            return [sys.executable, "-m", "job", *args]
        launch = ["-m", "job.launch", "--standalone", "--nproc-per-node", str(nproc)]
        return [sys.executable, *launch, "-m", "job", *args]

    def start_train(self, label: str, run_dir: Path, *extra: str, nproc: int = 1) -> Run:
        cmd = self.job_cmd("train", "--config", SMOKE, *self.overrides(run_dir, *extra), nproc=nproc)
        return self.start(label, cmd, run_dir)

    def start(self, label: str, cmd: list[str], run_dir: Path | None = None) -> Run:
        log = self.logs / f"{label}.log"
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        if not self.cuda:
            env.setdefault("OMP_NUM_THREADS", "1")  # light on a shared CI machine; the same in every run
        with open(log, "w") as out:
            out.write(" ".join(cmd) + "\n\n")
            out.flush()
            process = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        run = Run(label, cmd, log, process, time.monotonic(), run_dir)
        self.started_runs.append(run)
        self.current.runs.append({"label": label, "command": " ".join(cmd), "log": str(log.relative_to(self.args.out))})
        return run

    def wait(self, run: Run) -> int:
        """The run's exit status; a run still going at the deadline is killed (Failed)."""
        try:
            code = run.process.wait(timeout=max(1.0, self.time_left()))
        except subprocess.TimeoutExpired:
            kill_tree(run.process.pid)
            run.process.wait()
            raise Failed(
                f"{run.label} was still running at the deadline, {time.monotonic() - run.started:.0f} s after it "
                f"started, and was killed: hung, or too slow for --deadline {self.args.deadline:g}; see {run.log}"
            ) from None
        record = next(r for r in self.current.runs if r["label"] == run.label)
        record.update(exit=code, seconds=round(time.monotonic() - run.started, 1))
        return code

    def finish(self, run: Run) -> Run:
        code = self.wait(run)
        if code != 0:
            raise Failed(f"{run.label} exited {code}: {last_line(run.log.read_text())} (log: {run.log})")
        return run

    def wait_for_checkpoint(self, run: Run) -> int:
        """The step of the first checkpoint the run writes; Failed if it ends before writing one."""
        checkpoints = run_files(run.run_dir).checkpoints
        while run.process.poll() is None:
            written = checkpoints.files()
            if written:
                return checkpoints.step_of(written[0])
            if self.time_left() <= 0:
                break
            time.sleep(0.005)
        self.wait(run)
        raise Failed(f"{run.label} ended (exit {run.process.returncode}) before its first checkpoint: see {run.log}")

    def summary(self, run: Run, world_size: int, backend: str | None = None) -> dict:
        """summary.json of a finished run, checked to have run where it should have."""
        summary = self.summary_of(run.run_dir)
        backend = backend or ("nccl" if self.cuda else "gloo")
        seen = (summary.get("device"), summary.get("backend"), summary.get("world_size"))
        if seen != (self.device, backend, world_size):
            raise Failed(
                f"{run.label} ran as device/backend/world size {seen}, expected {(self.device, backend, world_size)}"
            )
        record = next(r for r in self.current.runs if r["label"] == run.label)
        record.update({k: summary.get(k) for k in ("device", "backend", "world_size", "launcher", "test_accuracy")})
        self.current.ran_on = f"{summary['device']}/{summary['backend']}"
        return summary

    @staticmethod
    def summary_of(run_dir: Path) -> dict:
        return json.loads(run_files(run_dir).summary.read_text())

    # --- the reports -------------------------------------------------------------------------------

    def write_reports(self) -> str:
        counts = {s: sum(step.status == s for step in self.steps) for s in ("passed", "failed", "skipped")}
        result = {
            "ok": counts["failed"] == 0,
            "mode": self.device,
            "allow_cpu": self.args.allow_cpu,
            "counts": counts,
            "skipped_by_deadline": [
                s.name for s in self.steps if s.status == "skipped" and s.detail.startswith("deadline")
            ],
            "seconds": round(self.elapsed(), 1),
            "deadline_s": self.args.deadline,
            "started_utc": f"{self.started_utc:%Y-%m-%d %H:%M:%S}",
            "data": self.data_note,
            "environment": self.environment,
            "steps": [
                {
                    "name": s.name,
                    "status": s.status,
                    "detail": s.detail,
                    "seconds": round(s.seconds, 1),
                    "ran_on": s.ran_on,
                    "cuda_only": s.cuda_only,
                    "proves": s.proves,
                    "runs": s.runs,
                }
                for s in self.steps
            ],
        }
        (self.args.out / "gpu-check.json").write_text(json.dumps(result, indent=2) + "\n")
        markdown = self.markdown(result)
        (self.args.out / "gpu-check.md").write_text(markdown)
        return markdown

    def markdown(self, result: dict) -> str:
        counts = result["counts"]
        late = result["skipped_by_deadline"]
        verdict = (
            "FAILED"
            if not result["ok"]
            else f"PASSED, INCOMPLETE ({len(late)} left for the deadline)"
            if late
            else "PASSED"
        )
        where = self.environment.get("GPU", "no GPU") if self.cuda else "the CPU (--allow-cpu: CUDA steps skipped)"
        lines = [
            "# GPU check",
            "",
            f"**{verdict}**: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
            f"in {result['seconds']:.0f} s (deadline {result['deadline_s']:g} s) on {where}; "
            f"{result['started_utc']} UTC. Data: {result['data'] or 'none'}.",
            "",
            "## Environment",
            "",
            "| | |",
            "| --- | --- |",
            *(f"| {key} | {cell(value)} |" for key, value in self.environment.items()),
            "",
            "## Steps (* = CUDA only)",
            "",
            "| step | result | s | ran on | checks | detail |",
            "| --- | --- | ---: | --- | --- | --- |",
        ]
        for s in self.steps:
            name = s.name + (" *" if s.cuda_only else "")
            lines.append(
                f"| {name} | {s.status} | {s.seconds:.1f} | {s.ran_on} | {cell(s.proves)} | {cell(s.detail)} |"
            )
        failed = [s for s in self.steps if s.status == "failed"]
        for s in failed:
            lines += ["", f"## {s.name}: failed", "", s.detail]
            for run in s.runs:
                tail = (self.args.out / run["log"]).read_text().splitlines()[-15:]
                lines += [
                    "",
                    f"`{run['label']}` (exit {run.get('exit', '-')}), last lines of {run['log']}:",
                    "",
                    "```",
                    *tail,
                    "```",
                ]
        bench = self.args.out / "bench-gpu.md"
        if bench.exists():
            lines += ["", "## bench --gpu", "", bench.read_text().strip()]
        lines += ["", f"Runs' logs: {self.logs}. Command: {' '.join(sys.argv)}", ""]
        return "\n".join(lines)


# --- the net, in this process ----------------------------------------------------------------------


def net_pass(device: torch.device, variant: str) -> list[torch.Tensor]:
    """The loss and the gradients of one training step of the job's net (dropout on) from fixed seeds."""
    import torch.nn.functional as F

    from job.model import Net

    torch.manual_seed(0)
    model = Net().to(device).train()
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(64, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (64,), generator=g)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "bf16"):
        output = model(images)
    loss = F.nll_loss(output.float(), labels.to(device))
    loss.backward()
    return [loss.detach().cpu(), output.detach().float().cpu(), *(p.grad.cpu() for p in model.parameters())]


SGD_STEPS = 30


def sgd_steps(device: torch.device, fills: bool) -> list[torch.Tensor]:
    """The job's net after SGD_STEPS training steps (dropout on, SGD lr 0.05 momentum 0.5) from fixed
    seeds, with torch's NaN fills of new tensors on or off (deterministic mode)."""
    import torch.nn.functional as F

    from job.model import Net

    torch.utils.deterministic.fill_uninitialized_memory = fills
    torch.manual_seed(0)
    model = Net().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(SGD_STEPS):
        images, labels = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
        optimizer.zero_grad()
        F.nll_loss(model(images.to(device)), labels.to(device)).backward()
        optimizer.step()
    return [t.detach().cpu() for t in model.state_dict().values()]


# --- data ------------------------------------------------------------------------------------------


def find_data_file(folder: Path, name: str) -> Path | None:
    for where in (folder, folder / "MNIST" / "raw", folder / "raw"):
        for candidate in (where / name, where / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def write_generated_mnist(raw: Path) -> None:
    """MNIST-shaped IDX files of learnable digits: class k is a bright 6x6 block at its own place."""
    for prefix, n, seed in (("train", 60000, 0), ("t10k", 10000, 1)):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for k in range(10):
            row, col = 3 + 7 * (k // 4), 3 + 6 * (k % 4)
            images[labels == k, row : row + 6, col : col + 6] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def write_idx(path: Path, array: torch.Tensor) -> None:
    header = (0x0800 | array.dim()).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = array.to(torch.uint8).contiguous()
    path.write_bytes(header + ctypes.string_at(data.data_ptr(), data.numel()))  # no numpy: a host's torch may lack it


# --- comparing runs --------------------------------------------------------------------------------


def run_files(run_dir: Path) -> RunDir:
    """`run_dir`'s files as the job names them (job/run_dir.py). Imported when first needed, not at the
    top: this script starts on the standard library and torch, and its environment step reports a job
    that does not import."""
    from job.run_dir import RunDir

    return RunDir(run_dir)


def checkpoint_steps(run_dir: Path) -> list[int]:
    checkpoints = run_files(run_dir).checkpoints
    return [checkpoints.step_of(p) for p in checkpoints.files()]


def mid_run_checkpoint(run_dir: Path) -> tuple[int, Path]:
    """The middle one of a finished run's checkpoints written inside its training: (step, file)."""
    final = json.loads(run_files(run_dir).summary.read_text())["global_step"]
    inside = [step for step in checkpoint_steps(run_dir) if 0 < step < final]
    if not inside:
        raise Failed(f"{run_dir} holds no checkpoint from inside its training (final step {final})")
    step = inside[len(inside) // 2]
    return step, run_files(run_dir).checkpoints.path_for(step)


def weights_equal(a: Path, b: Path) -> bool:
    first, second = (torch.load(run_files(d).model, map_location="cpu", weights_only=True) for d in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def same_weights(a: Path, b: Path, what: str) -> None:
    if not weights_equal(a, b):
        raise Failed(f"{what} end with different weights ({run_files(a).model} vs {run_files(b).model})")


def describe(summary: dict) -> str:
    return (
        f"{summary['device']}/{summary['backend']} W={summary['world_size']}, {summary['global_step']} steps, "
        f"accuracy {summary['test_accuracy']:.4f}, {summary['train_samples_per_second']:,.0f} samples/s"
    )


def cell(text: str) -> str:
    """Text for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything under it (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    for each in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


# --- the environment -------------------------------------------------------------------------------


def environment(device: str) -> dict[str, str]:
    """What this host offers the job, as the report's table shows it."""
    info = {
        "Python": f"{platform.python_version()} ({sys.executable})",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        "host": f"{platform.platform()}, {os.cpu_count()} CPUs, {memory_gib():.0f} GiB",
    }
    if torch.version.cuda:
        info["cuDNN"] = str(torch.backends.cudnn.version())
        try:
            version = torch.cuda.nccl.version()  # a tuple; an int in older torch
            info["NCCL"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as e:  # a build without NCCL: say so, the steps will tell the rest
            info["NCCL"] = f"unknown ({type(e).__name__}: {e})"
    info["driver"] = driver()
    if torch.cuda.is_available() and torch.cuda.device_count():
        props = torch.cuda.get_device_properties(0)
        info["GPU"] = (
            f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"compute capability {props.major}.{props.minor}"
        )
    for name in ("cc", "c++"):
        path = shutil.which(name)
        info[name] = f"{path}: {first_line([path, '--version'])}" if path else "missing"
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    info["Python.h"] = str(headers) if headers.is_file() else f"missing ({headers})"
    try:
        shm = os.statvfs("/dev/shm")
        info["/dev/shm"] = (
            f"{shm.f_blocks * shm.f_frsize / 2**30:.1f} GiB ({shm.f_bavail * shm.f_frsize / 2**30:.1f} free)"
        )
    except OSError as e:
        info["/dev/shm"] = f"missing ({e.strerror})"
    try:
        from job.device import compile_toolchain_missing, cuda_unavailable_reason

        info["torch.compile lacks"] = ", ".join(compile_toolchain_missing(torch.device(device))) or "nothing"
        reason = cuda_unavailable_reason()
        if reason:
            info["CUDA unusable because"] = reason
    except ImportError as e:
        info["torch.compile lacks"] = f"unknown: the job does not import ({e})"
    for package in ("torchvision", "accelerate", "PyYAML", "pillow", "tensorboard", "numpy"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "missing"
    return info


def driver() -> str:
    smi = shutil.which("nvidia-smi") or shutil.which("nvidia-smi", path="/usr/local/nvidia/bin")
    if smi:
        line = first_line([smi, "--query-gpu=driver_version", "--format=csv,noheader"])
        if line and "fail" not in line.lower():
            return f"{line} (nvidia-smi)"
    version = Path("/proc/driver/nvidia/version")
    if version.is_file():
        return version.read_text().splitlines()[0]
    return "none found (no nvidia-smi, no /proc/driver/nvidia)"


def first_line(cmd: list[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"({e})"
    return (result.stdout.strip() or result.stderr.strip()).splitlines()[0] if (result.stdout or result.stderr) else ""


def memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            return int(line.split()[1]) / 2**20
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
