"""`make bench` / `make bench-gpu`: the job's training throughput beside the tutorial's, side by side.

    python tests/tools/bench.py [--rounds 3] [--data data] [--out docs/PERFORMANCE.md] [KEY=VALUE ...]
    python tests/tools/bench.py --gpu [--data data] [--out docs/PERFORMANCE.md]
    python tests/tools/bench.py --profile [--data data] [KEY=VALUE ...]
    python tests/tools/bench.py --kernels [--rounds 6]

CPU (`make bench`), four measurements, each in a fresh process, alternating within every
round so that load from elsewhere on the machine lands on all of them alike:

  (a) tutorial   the classic tutorial's loop (tests/tools/tutorial_mnist.py): PIL decode, ToTensor,
                 Normalize per sample, DataLoader batch 64, 1 process, torch's default threads
  (b) job W=1    `python -m job train`, the seed recipe for 1 epoch, 1 process, default threads
  (c) job W=2    the same under `torchrun --nproc-per-node 2`, 1 thread per rank
  (d) data path  the job's training batches for one epoch with no model: batches per second

Then, once each (CPU and GPU alike), the time to 99% test accuracy (--target) of the fast preset
(job/configs/fast.yaml, 4 epochs) beside the seed recipe's 3 epochs, 1 process: the training loop
plus evaluation up to the first epoch whose test accuracy reaches it, and process start to that
result (from the run's metrics.jsonl; the preset runs all its epochs, as its schedule spans them).

GPU (`make bench-gpu`, one CUDA device, W=1): the tutorial, the job twice (are the weights
bit-identical?), and the job with each speed.* switch. Every row must have run on CUDA (the
tutorial's output and the job's summary.json name the device); a row that fails or ran elsewhere
is marked FAILED in the table, the others are kept. Besides the epoch's samples/s, a job row
shows its steady speed (the median step) and its warm-up: the seconds the first steps took beyond
steady ones, which is where speed.compile pays its compilation.

--kernels measures what the CPU-kernel pin costs (job/cpu_kernels.py) apart from everything
else: CPU seconds per training step of the seed net (batch 64, one thread, tensors already in
memory), pinned at AVX2 and with the host's own kernels, each in a fresh process, alternating;
CPU time, not wall time, so other work on a shared machine moves it less.

--profile runs the job itself (1 process, 200 steps) under torch.profiler and prints where
the time goes, op by op: what docs/PERFORMANCE.md's analysis starts from.

Training figures are samples/s over the training loop only (no start-up, evaluation or
checkpoint writes: the job's summary.json `train_samples_per_second`). The results replace
the part of --out between its bench markers, with the machine they were measured on.
Exit status 1 when a CPU target is missed, or a GPU row failed or the job's reruns differ.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from job.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GPU_DEVICE = "cuda"
"""What every --gpu row's summary must name as its device: a row that ran elsewhere is a failure."""
TARGET = 0.99
"""The fast preset's promise (job/configs/fast.yaml; issue 25): 99% test accuracy."""
RECIPES = (("seed recipe", ()), ("fast preset", ("--config", "job/configs/fast.yaml")))
"""What the time-to-accuracy table runs to the end: the tutorial's 3 epochs, and the fast preset."""
SWITCHES = ["speed.bf16=true", "speed.channels_last=true", "speed.compile=true", "speed.data_on_device=false"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the comparison on one CUDA device")
    parser.add_argument("--profile", action="store_true", help="print the job's training step, op by op")
    parser.add_argument("--kernels", action="store_true", help="CPU time per step: AVX2 pin vs the host's kernels")
    parser.add_argument("--rounds", type=int, default=3, help="CPU: rounds of the four measurements")
    parser.add_argument(
        "--target", type=float, default=TARGET, help="the test accuracy the time-to-accuracy table times (0.99)"
    )
    parser.add_argument("--data", default="data", help="directory holding MNIST/raw/")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs/PERFORMANCE.md", help="where the results go ('-': none)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for the job's runs")
    args = parser.parse_args()
    if args.profile:
        return profile(args)
    if args.kernels:
        return kernel_cost(args.rounds)
    if args.gpu and not torch.cuda.is_available():
        sys.exit("bench: --gpu needs a CUDA device and torch sees none (check nvidia-smi and the driver)")
    with tempfile.TemporaryDirectory(prefix="mnist-ddp-bench-") as work:
        try:
            report, met = (gpu_bench if args.gpu else cpu_bench)(args, Path(work))
            timed, counted = time_to_accuracy(args, Path(work))
            report, met = f"{report}\n\n{timed}", met and counted
        except RunFailed as e:  # the CPU table's ratios need every run
            sys.exit(f"bench: {e}")
    report = f"{report}\n\nMachine: {machine(args.gpu)}.\n"
    print("\n" + report)
    if str(args.out) != "-":
        write_section(args.out, "gpu" if args.gpu else "cpu", report)
        print(f"written to {args.out}")
    return 0 if met else 1


# --- the runs -------------------------------------------------------------------------------------


def tutorial(args: argparse.Namespace, work: Path, device: str = "cpu") -> dict:
    cmd = [sys.executable, str(ROOT / "tests/tools/tutorial_mnist.py"), "--data", args.data, "--device", device]
    return json.loads(run(cmd, work, dict(os.environ)).strip().splitlines()[-1])


def job(
    args: argparse.Namespace, work: Path, nproc: int = 1, extra: tuple[str, ...] = (), epochs: int | None = 1
) -> dict:
    """`epochs` of the seed recipe (None: as many as the config, or `extra`'s --config, says); the
    summary, with the run directory."""
    common = ["train", "data.download=false", f"data.root={args.data}", f"run.dir={work}/run"]
    common += [f"train.epochs={epochs}"] if epochs is not None else []
    env = dict(os.environ)
    if nproc == 1:
        cmd = [sys.executable, "-m", "job", *common]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m", "job", *common]
        env["OMP_NUM_THREADS"] = "1"
    run([*cmd, *args.overrides, *extra], work, env)
    return {**json.loads(RunDir(work / "run").summary.read_text()), "run_dir": work / "run"}


def data_path(args: argparse.Namespace, work: Path) -> dict:
    """The job's batches for one epoch (sampler, permutation, gathers), with no model."""
    code = (
        "import json, time\n"
        "from job import data\n"
        f"split = data.load_split({args.data!r}, 'train')\n"
        "sampler = data.train_sampler(len(split), rank=0, world_size=1, seed=1)\n"
        "start = time.perf_counter()\n"
        "n = sum(1 for _ in data.train_batches(split, sampler, 64))\n"
        "print(json.dumps({'batches_per_second': n / (time.perf_counter() - start)}))\n"
    )
    return json.loads(run([sys.executable, "-c", code], work, dict(os.environ)).strip().splitlines()[-1])


def to_the_end(args: argparse.Namespace, work: Path, recipe: tuple[str, ...]) -> dict:
    """job() with `recipe`'s arguments, trained to its end, 1 process; with its metrics.jsonl events
    and the wall clock (time.time(), as metrics.jsonl's) when its process was started."""
    started = time.time()
    result = job(args, work, extra=recipe, epochs=None)
    return {**result, "events": metrics_events(result["run_dir"]), "started": started}


def metrics_events(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per event."""
    return [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]


def reached(result: dict, target: float) -> dict | None:
    """When a run first reached `target` test accuracy: {epoch, accuracy, loop_and_eval_s, from_start_s},
    or None if it never did. The training loop's seconds of each epoch are its samples over its
    samples/s (what the job reports: start-up, checkpoint writes and compilation excluded); the
    evaluation's, from the epoch's train_epoch event to its test event."""
    events = result["events"]
    loop_and_eval = 0.0
    for done, test in zip(
        (e for e in events if e["event"] == "train_epoch"), (e for e in events if e["event"] == "test"), strict=False
    ):
        samples = test["examples_seen"] // test["epoch"]
        loop_and_eval += samples / done["samples_per_second"] + (test["time"] - done["time"])
        if test["test_accuracy"] >= target:
            return {
                "epoch": test["epoch"],
                "accuracy": test["test_accuracy"],
                "loop_and_eval_s": loop_and_eval,
                "from_start_s": test["time"] - result["started"],
            }
    return None


def time_to_accuracy(args: argparse.Namespace, work: Path) -> tuple[str, bool]:
    """The table of RECIPES' time to args.target test accuracy, each run once, 1 process, and
    whether every row counts: with --gpu, as in gpu_bench, a run that failed or ran anywhere but
    on CUDA is a FAILED row (its times would be another device's) and the rows around it are kept."""
    lines = [
        f"Time to {args.target:.0%} test accuracy, 1 process, each recipe run once to its end: the training loop "
        "plus evaluation up to the first epoch that reaches it, and process start to that result.",
        "",
        f"| recipe | epochs | first at {args.target:.0%} | loop + evaluation | process start to result "
        "| final accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    ok = True
    for label, recipe in RECIPES:
        try:
            result = to_the_end(args, work / label.replace(" ", "-"), recipe)
        except RunFailed as e:
            if not args.gpu:  # the CPU report needs every run (main)
                raise
            lines.append(f"| {label} | | {e.row} | | | |")
            ok = False
            continue
        if args.gpu and (elsewhere := ran_elsewhere(result)):
            lines.append(f"| {label} | | {elsewhere} | | | |")
            ok = False
            continue
        first = reached(result, args.target)
        times = ("not reached", "", "")
        if first:
            times = (f"epoch {first['epoch']}", f"{first['loop_and_eval_s']:.1f} s", f"{first['from_start_s']:.1f} s")
        lines.append(f"| {label} | {result['epochs']} | {' | '.join(times)} | {result['test_accuracy']:.2%} |")
        print(f"time to {args.target:.0%}, {label}: {', '.join(t for t in times if t)}", flush=True)
    return "\n".join(lines), ok


class RunFailed(Exception):
    """A measured run exited non-zero: its command, exit status and last lines."""

    def __init__(self, cmd: list[str], code: int, output: str) -> None:
        self.code, self.tail = code, output.strip().splitlines()[-5:] or ["(no output)"]
        super().__init__(f"{' '.join(cmd[:5])} ... failed (exit {code}):\n" + "\n".join(self.tail))

    @property
    def row(self) -> str:
        """What a --gpu table's row says of it."""
        return f"FAILED (exit {self.code}): {self.tail[-1].strip()}"


def ran_elsewhere(result: dict) -> str | None:
    """What a --gpu table's row says of a run whose summary names a device other than CUDA; None on CUDA."""
    if result.get("device") == GPU_DEVICE:
        return None
    return f"FAILED: ran on {result.get('device')!r}, not {GPU_DEVICE}"


def run(cmd: list[str], work: Path, env: dict[str, str]) -> str:
    work.mkdir(parents=True)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (work / "log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RunFailed(cmd, result.returncode, result.stdout + result.stderr)
    return result.stdout


# --- CPU ------------------------------------------------------------------------------------------

CPU_RUNS: dict[str, tuple[str, Callable[[argparse.Namespace, Path], dict]]] = {
    "a": ("tutorial loop, 1 process", tutorial),
    "b": ("job, 1 process", job),
    "c": ("job, 2 ranks x 1 thread", lambda args, work: job(args, work, nproc=2)),
    "d": ("job's data path, no model", data_path),
    "e": ("job, 1 process, speed.native_cpu_kernels=true", lambda args, work: job(args, work, extra=NATIVE)),
}
NATIVE = ("speed.native_cpu_kernels=true",)
"""(e): the host's own CPU instruction set instead of the AVX2 pin (job/cpu_kernels.py): what the pin costs."""


def cpu_bench(args: argparse.Namespace, work: Path) -> tuple[str, bool]:
    results: dict[str, list[dict]] = {name: [] for name in CPU_RUNS}
    names = list(CPU_RUNS)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # a different one goes first each round
            label, measure = CPU_RUNS[name]
            result = measure(args, work / f"{name}{r}")
            results[name].append(result)
            if name == "d":
                shown = f"{result['batches_per_second']:,.0f} batches/s"
            else:
                shown = f"{result['train_samples_per_second']:,.0f} samples/s, accuracy {result['test_accuracy']:.2%}"
            print(f"round {r + 1}/{args.rounds} ({name}) {label}: {shown}", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    speed = {n: median(n, "train_samples_per_second") for n in "abce"}
    accuracy = {n: median(n, "test_accuracy") for n in "abce"}
    batches = median("d", "batches_per_second")
    targets = [
        ("(b)/(a): job vs tutorial", speed["b"] / speed["a"], ">= 4", speed["b"] / speed["a"] >= 4),
        ("(c)/(b): 2 ranks x 1 thread vs 1 process", speed["c"] / speed["b"], ">= 0.9", speed["c"] / speed["b"] >= 0.9),
        ("(d) batches/s vs (b) steps/s", batches / (speed["b"] / 64), ">= 20", batches / (speed["b"] / 64) >= 20),
        ("test accuracy (b) - (a), points", 100 * abs(accuracy["b"] - accuracy["a"]), "<= 0.5",
         abs(accuracy["b"] - accuracy["a"]) <= 0.005),
    ]  # fmt: skip
    lines = [
        f"Medians of {args.rounds} alternating rounds; 1 epoch of the seed recipe (batch 64, SGD lr 0.01 "
        "momentum 0.5, fp32)" + (f" with {' '.join(args.overrides)}" if args.overrides else "") + ".",
        "",
        "| | run | samples/s | min - max | s/epoch | test accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for n in "abce":
        low, high = (f(r["train_samples_per_second"] for r in results[n]) for f in (min, max))
        lines.append(
            f"| ({n}) | {CPU_RUNS[n][0]} | {speed[n]:,.0f} | {low:,.0f} - {high:,.0f} | {60000 / speed[n]:.1f} "
            f"| {accuracy[n]:.2%} |"
        )
    lines.insert(-1, f"| (d) | {CPU_RUNS['d'][0]} | {64 * batches:,.0f} | | | {batches:,.0f} batches/s |")
    lines.append(
        f"\n(e)/(b), the host's own CPU kernels vs the AVX2 pin: {speed['e'] / speed['b']:.2f} "
        f"(this host's CPU kernels: {torch.backends.cpu.get_cpu_capability()} with the pin off)."
    )
    lines += ["", "| target | measured | wanted | |", "| --- | ---: | ---: | --- |"]
    lines += [
        f"| {what} | {value:.2f} | {wanted} | {'met' if ok else 'MISSED'} |" for what, value, wanted, ok in targets
    ]
    return "\n".join(lines), all(ok for *_, ok in targets)


# --- GPU ------------------------------------------------------------------------------------------


def gpu_bench(args: argparse.Namespace, work: Path) -> tuple[str, bool]:
    """Each row measured on its own: a row that fails, or that ran anywhere but on CUDA, is a
    failure in the table (and the exit status), and the rows around it are kept."""
    rows: list[tuple[str, dict | None, str]] = []
    same = False
    runs: list[tuple[str, Callable[[], dict]]] = [
        ("tutorial loop", lambda: tutorial(args, work / "tutorial", device="cuda")),
        ("job", lambda: job(args, work / "job1")),
        ("job, again", lambda: job(args, work / "job2")),
    ]
    for switch in [*SWITCHES, "speed.channels_last=true speed.compile=true"]:
        runs.append(
            (f"job {switch}", functools.partial(job, args, work / switch.replace(" ", "+"), 1, tuple(switch.split())))
        )
    for label, measure in runs:
        try:
            result = measure()
        except RunFailed as e:
            rows.append((label, None, e.row))
            print(f"{label}: {e}", flush=True)
            continue
        note = ""
        if elsewhere := ran_elsewhere(result):
            result, note = None, elsewhere
        elif label == "job, again" and rows[1][1] is not None:
            same = identical(RunDir(rows[1][1]["run_dir"]).model, RunDir(result["run_dir"]).model)
            note = f"bit-identical to the first: {'yes' if same else 'NO'}"
        rows.append((label, result, note))
        shown = f"{result['train_samples_per_second']:,.0f} samples/s" if result else ""
        print(f"{label}: {shown} {note}", flush=True)
    lines = [
        "One CUDA device, W=1, 1 epoch of the seed recipe. samples/s: over the epoch's training loop; "
        "steady: from the median step (timed between the steps logged every 10); warm-up: what the loop "
        "took beyond that many steady steps (compilation with speed.compile, cuDNN and cuBLAS set-up, "
        "first allocations).",
        "",
        "| run | samples/s | steady samples/s | warm-up s | s/epoch | test accuracy | |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, result, note in rows:
        if result is None:
            lines.append(f"| {label} | | | | | | {note} |")
            continue
        speed = result["train_samples_per_second"]
        timing = step_times(result)
        steady, warm_up = (f"{64 / timing[0]:,.0f}", f"{timing[1]:.2f}") if timing else ("", "")
        lines.append(
            f"| {label} | {speed:,.0f} | {steady} | {warm_up} | {60000 / speed:.2f} | {result['test_accuracy']:.2%} "
            f"| {note} |"
        )
    met = same and all(result is not None for _, result, _ in rows)
    return "\n".join(lines), met


def step_times(result: dict) -> tuple[float, float] | None:
    """A job run's (steady seconds per step, warm-up seconds), from its metrics.jsonl: the median
    time per step between consecutive logged steps, and the training loop's seconds beyond that
    many steady steps. None for a run without a run directory (the tutorial) or too few logs."""
    if not result.get("run_dir") or not RunDir(result["run_dir"]).metrics.exists():
        return None
    events = metrics_events(result["run_dir"])
    logged = [(e["step"], e["time"]) for e in events if e["event"] == "train"]
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(logged, logged[1:], strict=False) if s1 > s0]
    if len(per_step) < 3:
        return None
    steady = statistics.median(per_step)
    return steady, max(0.0, result["train_seconds"] - result["global_step"] * steady)


def identical(a: Path, b: Path) -> bool:
    first, second = (torch.load(p, weights_only=True) for p in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --- profile --------------------------------------------------------------------------------------


STEP_COST = """
import json, sys, time
from job.cpu_kernels import pin_cpu_kernels
pin_cpu_kernels(native=sys.argv[1] == "native")
import torch, torch.nn.functional as F
from job.cpu_kernels import cpu_capability
from job.model import Net
torch.set_num_threads(1)
torch.manual_seed(1)
net = Net()
optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5)
images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
def step():
    optimizer.zero_grad()
    F.nll_loss(net(images), labels).backward()
    optimizer.step()
for _ in range(20):
    step()
start = time.process_time()
for _ in range(300):
    step()
print(json.dumps({"kernels": cpu_capability(), "ms": 1000 * (time.process_time() - start) / 300}))
"""


def kernel_cost(rounds: int) -> int:
    """--kernels: the median CPU milliseconds per step, pinned and native, over alternating rounds."""
    ms: dict[str, list[float]] = {"portable": [], "native": []}
    names: dict[str, str] = {}
    for r in range(rounds):
        for mode in ("portable", "native")[:: 1 if r % 2 == 0 else -1]:
            cmd = [sys.executable, "-c", STEP_COST, mode]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            result = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
            ms[mode].append(result["ms"])
            names[mode] = result["kernels"]
            shown = f"{mode} ({result['kernels']}): {result['ms']:.2f} ms CPU per step"
            print(f"round {r + 1}/{rounds} {shown}", flush=True)
    pinned, native = (statistics.median(ms[mode]) for mode in ("portable", "native"))
    print(
        f"median CPU time per step: {pinned:.2f} ms pinned ({names['portable']}), {native:.2f} ms with the host's "
        f"kernels ({names['native']}): the pin costs {100 * (pinned / native - 1):.0f}%; {machine(gpu=False)}"
    )
    return 0


def profile(args: argparse.Namespace) -> int:
    """The job's own training run (1 process, 200 steps of the recipe) under torch.profiler."""
    import runpy

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    with tempfile.TemporaryDirectory(prefix="mnist-ddp-profile-") as work:
        sys.argv = [
            "job", "train", "train.epochs=1", "data.train_limit=12800", "data.download=false",
            f"data.root={args.data}", f"run.dir={work}/run", *args.overrides,
        ]  # fmt: skip
        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            try:
                runpy.run_module("job", run_name="__main__")
            except SystemExit as e:
                if e.code:
                    return int(e.code) if isinstance(e.code, int) else 1
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


# --- the report -----------------------------------------------------------------------------------


def machine(gpu: bool) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_gib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")) / 2**20
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    parts = [
        f"{os.cpu_count()} CPUs ({cpu}), {mem_gib:.0f} GiB",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads by default)",
        f"Python {platform.python_version()}",
        f"commit {revision.stdout.strip() or 'unknown'}",
        f"measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "load average at the end {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    ]
    if gpu:
        parts.insert(1, f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return ", ".join(parts)


def write_section(path: Path, kind: str, report: str) -> None:
    """Replace what lies between `<!-- bench:KIND -->` and `<!-- /bench:KIND -->` in path."""
    start, end = f"<!-- bench:{kind} -->", f"<!-- /bench:{kind} -->"
    text = path.read_text() if path.exists() else ""
    if start not in text or end not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    path.write_text(f"{head}{start}\n{report}{end}{rest.split(end, 1)[1]}")


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"bench: {time.monotonic() - started:.0f} s")
    sys.exit(status)
