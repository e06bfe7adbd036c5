"""Resume: from any checkpoint (mid-epoch too) a run ends with the bits of an uninterrupted run.

One uninterrupted 2-rank run keeps all its checkpoints (every 3 steps and at both
epoch ends: steps 3, 6, 8, 9, 12, 15, 16): the session's shared `two_rank_checkpointed_run`
(tests/reference_runs.py). The tests resume from its checkpoints, and damage them and
change the config under them in copies of it (it is never written to).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_TRAIN,
    assert_ok,
    assert_one_line_error,
    assert_same_weights,
    checkpoint,
    clean_env,
    read_summary,
    run_job,
    snapshot,
    tiny_overrides,
)

from job import data
from job.checkpoint import check_fields, recipe_digest
from job.model import state_shapes
from job.progress import Progress
from job.run_dir import RunDir

CHECKPOINTING = ("checkpoint.every_steps=3", "checkpoint.keep=100")
"""The reference's checkpoint cadence, for the runs that resume from it and the tests' own runs."""
STEPS = [3, 6, 8, 9, 12, 15, 16]


@pytest.fixture
def reference(two_rank_checkpointed_run) -> Path:
    """The uninterrupted 2-rank run's directory (shared: read it, or copy it before a change)."""
    assert two_rank_checkpointed_run.overrides == CHECKPOINTING and two_rank_checkpointed_run.nproc == 2
    return two_rank_checkpointed_run.dir


def start_again(run_dir: Path, tiny_root: Path) -> subprocess.CompletedProcess[str]:
    """The interrupted job started again with its own command (2 ranks, checkpointing as the
    reference did), as a user or a Job's restart would; it must finish."""
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, *CHECKPOINTING)], nproc=2)
    assert_ok(result)
    return result


def killed_copy(reference: Path, dest: Path, last_step: int) -> Path:
    """The reference run directory as a kill right after `last_step`'s checkpoint leaves it: newer
    checkpoints and the results missing, metrics logged past the checkpoint, a half-written file."""
    shutil.copytree(reference, dest)
    for step in STEPS:
        if step > last_step:
            checkpoint(dest, step).unlink()
    RunDir(dest).model.unlink()
    RunDir(dest).summary.unlink()
    (RunDir(dest).checkpoints.path / f".step-{last_step + 1:09d}.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    return dest


@pytest.mark.processes
def test_checkpoints_hold_everything_a_resume_needs(reference):
    assert sorted(p.name for p in RunDir(reference).checkpoints.path.iterdir()) == [f"step-{s:09d}.pt" for s in STEPS]
    state = torch.load(checkpoint(reference, 9), weights_only=True)
    assert (state["epochs_done"], state["batches_done"], state["global_step"]) == (1, 1, 9), "batch 1 of epoch 2"
    assert state["world_size"] == 2 and state["train_samples"] == TINY_TRAIN
    assert state["samples_trained"] == 9 * 64
    assert state["recipe"] == {
        "seed": 1,
        "data.global_batch_size": 64,
        "data.train_limit": None,
        "model.dropout": 0.5,
        "optim.lr": 0.05,
        "optim.momentum": 0.5,
    }
    assert state["recipe_digest"] == recipe_digest(state["recipe"])
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values()), "optimizer state is kept"
    rng = state["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"]), "each rank's own dropout stream"
    assert {"cpu", "python"} <= set(rng[0])


@pytest.mark.processes
def test_only_the_newest_checkpoints_are_kept(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_root, run_dir, "checkpoint.every_steps=3", "checkpoint.keep=2", "train.epochs=1")
    assert_ok(run_job(["train", *overrides]))
    assert sorted(p.name for p in RunDir(run_dir).checkpoints.path.iterdir()) == [
        "step-000000006.pt",
        "step-000000008.pt",
    ]


@pytest.mark.processes
@pytest.mark.parametrize("step", [6, 8, 15], ids=["mid-epoch-1", "epoch-end", "mid-epoch-2"])
def test_resuming_from_any_checkpoint_gives_the_uninterrupted_bits(reference, tiny_root, tmp_path, step):
    run_dir = tmp_path / "run"
    start = f"train.resume={checkpoint(reference, step)}"
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, *CHECKPOINTING, start)], nproc=2)
    assert_ok(result)
    assert f"Resuming from {checkpoint(reference, step)}" in result.stdout
    assert_same_weights(run_dir, reference)
    summary = read_summary(run_dir)
    assert (summary["global_step"], summary["samples_trained"], summary["resumes"]) == (16, 2 * TINY_TRAIN, 1)


@pytest.mark.processes
def test_a_killed_run_directory_resumes_by_itself(reference, tiny_root, tmp_path):
    run_dir = killed_copy(reference, tmp_path / "run", last_step=9)
    result = start_again(run_dir, tiny_root)
    assert f"Resuming from {checkpoint(run_dir, 9)}: epoch 2, batch 1/8, step 9" in result.stdout
    assert_same_weights(run_dir, reference)
    assert not list(RunDir(run_dir).checkpoints.path.glob(".*.tmp")), "the interrupted write's temp file is removed"

    def events(path: Path, kind: str) -> list[tuple]:
        lines = [json.loads(line) for line in RunDir(path).metrics.read_text().splitlines()]
        return [(e["step"], e.get("loss"), e.get("test_loss")) for e in lines if e["event"] == kind]

    for kind in ("train", "test"):
        assert events(run_dir, kind) == events(reference, kind), f"{kind} events as in one uninterrupted run"
    assert [step for step, *_ in events(run_dir, "resume")] == [9]


@pytest.mark.processes
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tiny_root, tmp_path):
    run_dir = killed_copy(reference, tmp_path / "run", last_step=9)
    newest = checkpoint(run_dir, 9)
    newest.write_bytes(newest.read_bytes()[:5000])
    result = start_again(run_dir, tiny_root)
    assert "skipping checkpoint step-000000009.pt: checkpoint" in result.stderr
    assert "is truncated or corrupt" in result.stderr
    assert f"Resuming from {checkpoint(run_dir, 8)}" in result.stdout
    assert_same_weights(run_dir, reference)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_MARKER']}",))


@pytest.mark.processes
def test_a_checkpoint_that_would_run_code_is_skipped_unexecuted(reference, tiny_root, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    run_dir = killed_copy(reference, tmp_path / "run", last_step=9)
    torch.save({"model": _Exploit()}, checkpoint(run_dir, 12))
    result = start_again(run_dir, tiny_root)
    assert "skipping checkpoint step-000000012.pt: checkpoint" in result.stderr
    assert "is not a weights-only file and was not loaded" in result.stderr
    assert not marker.exists(), "the pickle's code ran"
    assert_same_weights(run_dir, reference)


@pytest.mark.processes
def test_no_loadable_checkpoint_is_an_error_that_deletes_nothing(reference, tiny_root, tmp_path):
    run_dir = killed_copy(reference, tmp_path / "run", last_step=9)
    for step in (3, 6, 8, 9):
        checkpoint(run_dir, step).write_bytes(b"garbage")
    before = snapshot(run_dir)
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, *CHECKPOINTING)])
    assert_one_line_error(result, "none of the 4 checkpoint(s) in", "nothing was deleted")
    assert result.stderr.count("skipping checkpoint") == 4
    assert snapshot(run_dir) == before


@pytest.mark.processes
def test_train_resume_must_name_a_training_checkpoint(reference, tiny_root, tmp_path):
    start = f"train.resume={RunDir(reference).model}"
    result = run_job(["train", *tiny_overrides(tiny_root, tmp_path / "run", start)])
    assert_one_line_error(result, "is not a training checkpoint of this job", "a model.pt holds weights only")
    missing = run_job(["train", *tiny_overrides(tiny_root, tmp_path / "run", "train.resume=nope.pt")])
    assert_one_line_error(missing, "train.resume=nope.pt does not exist; pass a checkpoint file, or auto / never")
    assert not (tmp_path / "run").exists()


@pytest.mark.processes
def test_a_config_change_that_breaks_resume_is_refused(reference, tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = snapshot(run_dir)
    changed = ("optim.lr=0.02", "data.global_batch_size=32", "train.epochs=3")
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, *CHECKPOINTING, *changed)])
    assert_one_line_error(
        result, "cannot resume from", "data.global_batch_size 64 -> 32, optim.lr 0.05 -> 0.02", "run.name=<new name>"
    )
    assert snapshot(run_dir) == before


@pytest.mark.processes
def test_train_epochs_decides_how_a_finished_run_continues(reference, tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)

    before = snapshot(run_dir)
    again = run_job(["train", *tiny_overrides(tiny_root, run_dir, *CHECKPOINTING)])
    assert_ok(again)  # the same command after the run finished: said at once, nothing touched
    assert f"{run_dir} holds a finished run (2 epochs, step 16): nothing to do, nothing written" in again.stdout
    assert "Test set" not in again.stdout and "Resuming" not in again.stdout, "no data loaded, nothing evaluated"
    assert snapshot(run_dir) == before, "model.pt, summary.json, metrics.jsonl and config.yaml untouched"
    assert read_summary(run_dir)["resumes"] == read_summary(reference)["resumes"]

    cut_short = tmp_path / "cut-short"  # killed after its last checkpoint, before writing the results
    shutil.copytree(reference, cut_short, ignore=shutil.ignore_patterns("model.pt", "summary.json"))
    again = run_job(["train", *tiny_overrides(tiny_root, cut_short, *CHECKPOINTING)])
    assert_ok(again)  # nothing left to train, the results written from the last checkpoint
    assert "All 2 epochs were trained already" in again.stdout
    assert "epoch 3" not in again.stdout, "a finished run is not resumed into an epoch it will not train"
    assert_same_weights(cut_short, reference)

    fewer = run_job(["train", *tiny_overrides(tiny_root, run_dir, *CHECKPOINTING, "train.epochs=1")])
    assert_one_line_error(fewer, "it has trained into epoch 2 but train.epochs=1", "set train.epochs >= 2")

    more = run_job(["train", *tiny_overrides(tiny_root, run_dir, *CHECKPOINTING, "train.epochs=3")], nproc=2)
    assert_ok(more)
    straight = tmp_path / "straight"
    assert_ok(run_job(["train", *tiny_overrides(tiny_root, straight, *CHECKPOINTING, "train.epochs=3")], nproc=2))
    assert_same_weights(run_dir, straight)
    assert read_summary(run_dir)["global_step"] == 24


@pytest.mark.processes
def test_resuming_at_another_world_size_warns_and_finishes_the_epoch(reference, tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    start = f"train.resume={checkpoint(reference, 6)}"
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, *CHECKPOINTING, start)])
    assert_ok(result)
    assert "resuming a 2-rank checkpoint on 1 ranks" in result.stderr
    summary = read_summary(run_dir)
    assert (summary["global_step"], summary["samples_trained"]) == (16, 2 * TINY_TRAIN)
    assert summary["test_accuracy"] > 0.5


@pytest.mark.parametrize("old_world", [1, 2, 4])
@pytest.mark.parametrize("new_world", [1, 2, 4])
def test_skipped_batches_are_exactly_the_seen_samples_at_any_world_size(old_world, new_world):
    """The first k global batches are the same samples whatever the world size, so a resume at
    another size trains every sample of the epoch exactly once."""
    n, global_batch, k = 640, 64, 3
    split = data.Split(images=torch.arange(n), labels=torch.arange(n))  # each "image" is its own index

    def walked(world: int, skip: int, count: int | None) -> list[int]:
        seen = []
        for rank in range(world):
            sampler = data.train_sampler(n, rank, world, seed=1)
            sampler.set_epoch(2)
            batches = list(data.train_batches(split, sampler, global_batch // world, skip=skip))
            seen += [i for images, _ in batches[:count] for i in images.tolist()]
        return seen

    before, after = walked(old_world, 0, k), walked(new_world, k, None)
    assert len(before) == k * global_batch and len(after) == n - k * global_batch
    assert sorted(before + after) == list(range(n))


FORMAT_1_FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-format1-step4.pt"
"""A checkpoint written by commit 9c35061 (before the training position became job.progress.Progress):
2 gloo ranks on the generated data, the recipe of `reference`, after step 4 of epoch 1."""


@pytest.mark.processes
def test_a_checkpoint_written_before_the_progress_refactor_still_resumes(tiny_root, tmp_path):
    state = torch.load(FORMAT_1_FIXTURE, weights_only=True)
    check_fields(state, FORMAT_1_FIXTURE, state_shapes())
    assert Progress.from_dict(state) == Progress(epochs_done=0, batches_done=4, global_step=4, samples_trained=256)
    run_dir = tmp_path / "run"
    start = f"train.resume={FORMAT_1_FIXTURE}"
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, *CHECKPOINTING, start)], nproc=2)
    assert_ok(result)
    assert f"Resuming from {FORMAT_1_FIXTURE}: epoch 1, batch 4/8, step 4" in result.stdout
    summary = read_summary(run_dir)
    assert (summary["global_step"], summary["samples_trained"], summary["resumes"]) == (16, 2 * TINY_TRAIN, 1)


@pytest.mark.processes
def test_three_ranks_resume_mid_epoch_to_the_uninterrupted_bits(tiny_root, tmp_path):
    """At 3+ ranks a sum's rounding depends on its order: the rank-order gradient mean keeps a
    resumed process (DDP's first step, initial buckets) in step with an uninterrupted one."""
    three = ("data.global_batch_size=48", "data.train_limit=510", "train.epochs=1", *CHECKPOINTING)
    reference = tmp_path / "reference"
    assert_ok(run_job(["train", *tiny_overrides(tiny_root, reference, *three)], nproc=3))
    run_dir = tmp_path / "run"
    start = f"train.resume={checkpoint(reference, 6)}"
    assert_ok(run_job(["train", *tiny_overrides(tiny_root, run_dir, *three, start)], nproc=3))
    assert_same_weights(run_dir, reference)


@pytest.mark.processes
def test_a_resume_that_changes_what_the_bits_depend_on_says_so(tiny_root, tmp_path):
    """Threads per rank change how CPU kernels split their sums (1 vs 2 threads gave 4704 vs
    4738 correct digits in a report): recorded in summary.json and config.yaml, and a resume
    under other values warns as one at another world size does."""
    run_dir = tmp_path / "run"
    two_threads, one_thread = clean_env(OMP_NUM_THREADS="2"), clean_env(OMP_NUM_THREADS="1")
    first = run_job(["train", *tiny_overrides(tiny_root, run_dir, "train.epochs=1")], env=two_threads)
    assert_ok(first)
    assert read_summary(run_dir)["threads_per_rank"] == 2
    assert "threads_per_rank 2" in RunDir(run_dir).config.read_text().splitlines()[0]
    resumed = run_job(["train", *tiny_overrides(tiny_root, run_dir, "train.epochs=2")], env=one_thread)
    assert_ok(resumed)
    assert "written with threads_per_rank=2 under threads_per_rank=1" in resumed.stderr
    summary = read_summary(run_dir)
    assert summary["threads_per_rank"] == 1 and summary["torch"] == torch.__version__ and summary["device"] == "cpu"


@pytest.mark.processes
def test_a_newest_checkpoint_of_the_wrong_shape_falls_back_to_the_one_before(reference, tiny_root, tmp_path):
    """Loadable but wrong: torch.load reads it, load_state_dict would not. The choice of the newest
    valid checkpoint checks shapes and every field the resume reads."""
    run_dir = killed_copy(reference, tmp_path / "run", last_step=16)
    newest = checkpoint(run_dir, 16)
    state = torch.load(newest, weights_only=True)
    state["model"]["conv1.weight"] = torch.zeros(20, 1, 5, 5)
    torch.save(state, newest)
    result = start_again(run_dir, tiny_root)
    assert "skipping checkpoint step-000000016.pt" in result.stderr
    assert "model conv1.weight has shape (20, 1, 5, 5), the net's is (10, 1, 5, 5)" in result.stderr
    assert f"Resuming from {checkpoint(run_dir, 15)}" in result.stdout
    assert_same_weights(run_dir, reference)


READS_PROBE = Path(__file__).parent / "probes" / "checkpoint_reads"
"""A sitecustomize.py that logs every open of a checkpoint file and every torch.load, per process."""


def reads_per_rank(log: Path, names: dict[str, str]) -> dict[str, dict[str, list[str]]]:
    """What each rank opened and unpickled, by file name (`names`: the sha256 of each candidate
    checkpoint's bytes -> its name; a torch.load of other bytes is left out)."""
    per_rank: dict[str, dict[str, list[str]]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        event = json.loads(line)
        what = names.get(event["what"], event["what"]) if event["kind"] == "unpickle" else event["what"]
        if event["kind"] == "open" or what in names.values():
            per_rank.setdefault(event["rank"], {"open": [], "unpickle": []})[event["kind"]].append(what)
    return per_rank


@pytest.mark.processes
@pytest.mark.parametrize("start", ["own-newest", "train.resume", "damaged-newest", "finished"])
def test_a_resume_reads_and_unpickles_each_checkpoint_once_per_process(reference, tiny_root, tmp_path, start):
    """Rank 0 reads the checkpoint it chooses once and unpickles it once (the same state is checked
    and loaded); every other rank unpickles the bytes rank 0 sends it once and opens no file. Counted
    in each process of a real 2-rank resume by tests/probes/checkpoint_reads/sitecustomize.py."""
    run_dir, extra = tmp_path / "run", []
    if start == "train.resume":
        extra = [f"train.resume={checkpoint(reference, 6)}"]
    elif start == "finished":
        shutil.copytree(reference, run_dir)
    else:
        killed_copy(reference, run_dir, last_step=9)
    if start == "damaged-newest":
        checkpoint(run_dir, 9).write_bytes(checkpoint(run_dir, 9).read_bytes()[:5000])
    candidates = RunDir(run_dir).checkpoints.files() if run_dir.exists() else [checkpoint(reference, 6)]
    names = {hashlib.sha256(path.read_bytes()).hexdigest(): path.name for path in candidates}
    log = tmp_path / "reads.jsonl"
    env = clean_env(
        CHECKPOINT_READS_LOG=str(log), PYTHONPATH=os.pathsep.join([str(READS_PROBE), os.environ.get("PYTHONPATH", "")])
    )
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, *CHECKPOINTING, *extra)], nproc=2, env=env)
    assert_ok(result)

    chosen = {
        "own-newest": ["step-000000009.pt"],
        "train.resume": ["step-000000006.pt"],
        "damaged-newest": ["step-000000009.pt", "step-000000008.pt"],  # the damaged one, then the one before
        "finished": ["step-000000016.pt"],
    }[start]
    loaded = chosen[-1:] if start != "finished" else []  # a finished run's other ranks load nothing
    assert reads_per_rank(log, names) == {
        "0": {"open": chosen, "unpickle": chosen},
        **({"1": {"open": [], "unpickle": loaded}} if loaded else {}),
    }
