"""Chaos check: kill a training job at random moments, let it resume, compare the bits.

    python tests/tools/chaos.py [--kills 5] [--seed S] [--nproc 2] [--config FILE] [KEY=VALUE ...]

1. Trains once without interruption (the reference).
2. Trains again under `torchrun --max-restarts`, with kills aimed at random steps spread
   over the whole run: once the run has made progress past the aimed step (a new
   checkpoint), it waits a random moment more (a step, an evaluation, a checkpoint being
   written...) and SIGKILLs either the whole job (a lost node; the script starts the same
   command again, as a Job controller would) or one worker (an OOM kill; torchrun
   restarts the group).
3. Checks that the interrupted run's model.pt equals the reference's, tensor for tensor.

Exit status 0 only when every kill landed while the job was training and the weights
are bit-identical. `make chaos` runs it on real MNIST with the default recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import checkpoint_steps, kill_tree  # noqa: E402

from job.run_dir import RunDir  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=int(time.time()), help="seed of the kill schedule")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--config", default="job/configs/default.yaml")
    parser.add_argument("--max-delay", type=float, default=2.0, help="latest kill, seconds after a checkpoint")
    parser.add_argument("--work", type=Path, default=Path("runs/chaos"), help="where both runs go (replaced)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for name in ("reference", "chaos"):
        shutil.rmtree(args.work / name, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"chaos: {args.kills} kills, schedule seed {args.seed}, {args.nproc} ranks, work dir {args.work}")

    started = time.monotonic()
    reference = launch(args, "reference", restarts=0)
    if reference.wait() != 0:
        return fail(f"the reference run failed: see {args.work / 'reference.log'}")
    print(f"reference: {time.monotonic() - started:.1f} s uninterrupted")

    final_step = json.loads(RunDir(args.work / "reference").summary.read_text())["global_step"]
    run_dir = args.work / "chaos"
    aims = sorted(rng.uniform(0, 0.9 * final_step) for _ in range(args.kills))  # 0.9: leave checkpoints to aim at
    landed, attempt, newest, job = 0, 0, 0, launch(args, "chaos-0", restarts=args.kills)
    while landed < args.kills:
        newest = wait_for_checkpoint(job, run_dir, after=max(newest, aims[landed] - 1), before=final_step)
        delay = rng.uniform(0, args.max_delay)
        kind = rng.choice(["job", "worker"])
        if newest is None or not wait_running(job, delay):
            return fail(
                f"the job ended (exit {job.poll()}) before kill {landed + 1} of {args.kills}: it needs more "
                f"checkpoints (lower checkpoint.every_steps) or fewer kills; logs in {args.work}"
            )
        if not kill(job, kind, rng):
            continue
        landed += 1
        aimed = f"aimed at {aims[landed - 1]:.0f}"
        print(f"kill {landed}: {kind:6s} {delay:3.1f} s after the checkpoint at step {newest} ({aimed})")
        if kind == "job":
            job.wait()
            attempt += 1
            job = launch(args, f"chaos-{attempt}", restarts=args.kills)
        newest = max(checkpoint_steps(run_dir))  # the next kill waits for progress beyond this
    if job.wait() != 0:
        return fail(f"the interrupted job did not finish: see {args.work}/chaos-{attempt}.log")

    logs = "".join(p.read_text() for p in sorted(args.work.glob("chaos-*.log")))
    resumed = sorted({int(step) for step in re.findall(r"Resuming from \S+step-(\d+)\.pt", logs)})
    print(f"resumed from steps: {resumed or 'none (every kill came before the first checkpoint)'}")
    ours = torch.load(RunDir(args.work / "chaos").model, weights_only=True)
    theirs = torch.load(RunDir(args.work / "reference").model, weights_only=True)
    differing = [key for key in theirs if not torch.equal(ours[key], theirs[key])]
    if differing:
        return fail(f"weights differ from the uninterrupted run in {', '.join(differing)}")
    print(f"bit-identical: all {len(theirs)} tensors of model.pt equal the uninterrupted run's after {landed} kills")
    return 0


def launch(args: argparse.Namespace, name: str, restarts: int) -> subprocess.Popen:
    run_dir = args.work / ("reference" if name == "reference" else "chaos")
    cmd = [
        str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(args.nproc), "--max-restarts", str(restarts),
        "-m", "job", "train", "--config", args.config, *args.overrides, f"run.dir={run_dir}",
    ]  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": str(threads)}
    with open(args.work / f"{name}.log", "w") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_checkpoint(job: subprocess.Popen, run_dir: Path, after: int, before: int) -> int | None:
    """The step of a checkpoint past `after` (and before the final one) once it exists; None if
    the job ends first."""
    while job.poll() is None:
        fresh = [step for step in checkpoint_steps(run_dir) if after < step < before]
        if fresh:
            return max(fresh)
        time.sleep(0.05)
    return None


def wait_running(job: subprocess.Popen, seconds: float) -> bool:
    """Sleep `seconds` unless the job ends first; True if it is still running."""
    try:
        job.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return True
    return False


def kill(job: subprocess.Popen, kind: str, rng: random.Random) -> bool:
    if kind == "job":
        kill_tree(job.pid)
        return True
    workers = psutil.Process(job.pid).children()
    if not workers:  # between two restarts: no worker to kill at this moment
        return False
    rng.choice(workers).send_signal(signal.SIGKILL)
    return True


def fail(message: str) -> int:
    print(f"chaos: FAILED: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
