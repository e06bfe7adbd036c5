"""Real multi-process runs (torchrun and accelerate launch, gloo on CPU) on generated data.

Each test launches the job the way a user does and reads the run directory contract.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    REPO,
    TINY_TEST,
    TINY_TRAIN,
    assert_ok,
    assert_one_line_error,
    clean_env,
    load_state,
    read_summary,
    run_job,
    run_probe,
    tiny_overrides,
)

from job.model import Net
from job.run_dir import RunDir
from job.seeding import seed_parameter_init


@pytest.mark.processes
def test_torchrun_two_ranks_writes_the_run_directory_contract(two_rank_run):
    run_dir = two_rank_run.dir
    # The contract's names as users read them (docs/RUN-DIRECTORY.md); other tests take them from RunDir.
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "summary.json", "metrics.jsonl", "model.pt", "tb"}
    assert len(list(RunDir(run_dir).tensorboard.iterdir())) == 1, "only rank 0 writes TensorBoard events"
    summary = read_summary(run_dir)
    for key in ("test_accuracy", "test_loss", "world_size", "epochs", "global_step", "train_seconds"):
        assert key in summary
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert summary["global_step"] == 2 * -(-TINY_TRAIN // 64)
    assert summary["count"] == TINY_TEST
    assert summary["train_samples_per_second"] > 0
    assert summary["test_accuracy"] > 0.5, "generated digits are easy: training must have learned"

    state = load_state(RunDir(run_dir).model)
    assert set(state) == set(Net().state_dict()), "model.pt is the plain model's state_dict (no 'module.')"
    checkpoints = sorted(RunDir(run_dir).checkpoints.path.iterdir())
    assert [p.name for p in checkpoints] == ["step-000000008.pt", "step-000000016.pt"], "one per epoch end"
    last = torch.load(checkpoints[-1], weights_only=True)
    assert (last["epochs_done"], last["batches_done"]) == (2, 0)
    assert last["global_step"] == summary["global_step"] and last["world_size"] == 2
    assert last["optimizer"]["state"], "optimizer momentum must be in the checkpoint"
    assert all(torch.equal(last["model"][k], state[k]) for k in state)

    import yaml

    resolved = yaml.safe_load(RunDir(run_dir).config.read_text())
    assert resolved["run"]["dir"] == str(run_dir) and resolved["seed"] == 1


def test_tests_probes_and_tools_take_run_directory_names_from_run_dir():
    """job/run_dir.py names every file of a run directory once (RunDir); the test above spells the
    contract's names as users read them. Anywhere else in tests/, a path joined with one of those
    names by `/` is a second spelling that a rename would leave behind."""
    names = "|".join(re.escape(p.name) for p in RunDir(Path("run")).written())
    joined = re.compile(rf"""/\s*["']({names})["']""")
    spelled = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if joined.search(line)
    ]
    assert not spelled, "join run-directory names through job.run_dir.RunDir:\n" + "\n".join(spelled)


@pytest.mark.processes
def test_metrics_and_tensorboard_hold_every_figure(two_rank_run):
    run_dir = two_rank_run.dir
    events = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("test") == 2 and kinds.count("train_epoch") == 2 and "train" in kinds
    first_train = next(e for e in events if e["event"] == "train")
    assert first_train["examples_seen"] == 0 and first_train["lr"] == 0.05
    assert [e["examples_seen"] for e in events if e["event"] == "test"] == [TINY_TRAIN, 2 * TINY_TRAIN]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"images": 0}).Reload()
    assert set(acc.Tags()["scalars"]) >= {
        "train/loss",
        "train/lr",
        "train/samples_per_second",
        "test/loss",
        "test/accuracy",
    }
    assert "test/digits" in acc.Tags()["images"]
    image = acc.Images("test/digits")[-1]
    assert image.width > 3 * 28 and image.height > 2 * 28


@pytest.mark.processes
def test_log_lines_are_the_tutorials_and_rank_tagged(two_rank_run):
    lines = two_rank_run.result.stdout.splitlines()
    assert f"[rank 0] Train Epoch: 1 [0/{TINY_TRAIN} (0%)]  Loss: " in "\n".join(lines)
    assert any(line.startswith("[rank 0] Train Epoch: 2 [256/512 (50%)]  Loss: ") for line in lines), lines
    assert sum(line.startswith("[rank 0] Test set: Avg. loss: ") for line in lines) == 2
    assert not any(line.startswith("[rank 1]") for line in lines), "only rank 0 logs progress"


@pytest.mark.processes
def test_two_runs_give_bit_identical_weights(two_rank_run, two_rank_checkpointed_run):
    """Same recipe, same world size, dropout on: the same bits, tensor for tensor. The two shared
    2-rank runs differ only in how often they log and checkpoint, which must change no bit (the
    tests share such runs as one reference: tests/reference_runs.py)."""
    assert two_rank_run.nproc == two_rank_checkpointed_run.nproc == 2
    first, second = load_state(RunDir(two_rank_run.dir).model), load_state(RunDir(two_rank_checkpointed_run.dir).model)
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.processes
def test_ranks_start_identical_and_draw_distinct_dropout(tmp_path):
    out = tmp_path / "probe.json"
    result = run_probe("rank_streams.py", [str(out)], nproc=2)
    assert_ok(result)
    rank0, rank1 = json.loads(out.read_text())
    assert rank0["params"] == rank1["params"], "parameters must be identical on every rank"
    seed_parameter_init(1)
    tutorial_init = torch.cat([p.detach().flatten() for p in Net().parameters()])
    assert torch.equal(torch.tensor(rank0["params"]), tutorial_init), "W>1 must start from the seed's weights"
    assert rank0["mask"] != rank1["mask"], "dropout streams must differ per rank"


@pytest.mark.processes
def test_data_is_fetched_once_per_host_while_the_other_ranks_wait(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    assert_ok(run_probe("fetch_once.py", [str(root)], nproc=3))
    assert sorted(p.name for p in root.glob("fetched-by-*")) == ["fetched-by-rank-0"]
    loaded = {p.name: p.read_text() for p in root.glob("loaded-by-*")}
    assert loaded == {f"loaded-by-rank-{r}": str(TINY_TRAIN) for r in range(3)}


def test_the_trainer_reshuffles_every_epoch(tiny_root, tmp_path, monkeypatch):
    """set_epoch must be called: record the order the training loop walks, epoch by epoch."""
    from job import data
    from job.config import load_config
    from job.train import run_training

    orders = []
    original = data.train_batches

    def recording(split, sampler, rank_batch_size, skip=0):
        orders.append(list(sampler))
        return original(split, sampler, rank_batch_size, skip)

    monkeypatch.setattr(data, "train_batches", recording)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    try:
        run_training(load_config(overrides=tiny_overrides(tiny_root, tmp_path / "run", "train.epochs=3")))
    finally:
        torch.use_deterministic_algorithms(False)  # the job set it for this (test) process
    assert len(orders) == 3 and sorted(orders[0]) == list(range(TINY_TRAIN))
    assert orders[0] != orders[1] != orders[2] != orders[0]


@pytest.mark.processes
def test_two_ranks_follow_one_rank_without_dropout(tiny_root, tmp_path):
    """Global batch semantics: with dropout off, 2 ranks x 32 and 1 rank x 64 take the same
    steps on the same samples; only the order of float sums differs."""
    states = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"w{nproc}"
        assert_ok(run_job(["train", *tiny_overrides(tiny_root, run_dir, "model.dropout=0")], nproc=nproc))
        states[nproc] = load_state(RunDir(run_dir).model)
        assert read_summary(run_dir)["global_step"] == 2 * -(-TINY_TRAIN // 64)
    seed_parameter_init(1)
    init = Net().state_dict()
    for key, value in states[1].items():
        assert not torch.allclose(value, init[key]), f"{key} did not train"
        torch.testing.assert_close(states[2][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.processes
def test_evaluation_at_three_ranks_equals_one_rank_exactly(two_rank_run, tiny_root, tmp_path):
    """203 test samples over 3 ranks: padded shards would count 204 and change the accuracy."""
    run_dir = two_rank_run.dir
    args = ["evaluate", "--checkpoint", str(RunDir(run_dir).model), *tiny_overrides(tiny_root, tmp_path / "unused")]
    outputs = {}
    for nproc in (None, 3):
        result = run_job(args, nproc=nproc)
        assert_ok(result)
        json_lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        assert len(json_lines) == 1, "only rank 0 prints the result"
        outputs[nproc] = json.loads(json_lines[0])
    single, three = outputs[None], outputs[3]
    assert three["count"] == single["count"] == TINY_TEST
    assert three["correct"] == single["correct"]
    assert three["test_accuracy"] == single["test_accuracy"]
    assert three["test_loss"] == pytest.approx(single["test_loss"], rel=1e-6)
    summary = read_summary(run_dir)
    assert single["correct"] == summary["correct"], "evaluate must agree with the training run's last test"
    assert not (tmp_path / "unused").exists(), "evaluate writes no run directory"


@pytest.mark.processes
def test_accelerate_launch_two_processes(tiny_root, tmp_path):
    run_dir = tmp_path / "acc"
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, "train.epochs=1")], nproc=2, launcher="accelerate")
    assert_ok(result)
    summary = read_summary(run_dir)
    assert summary["world_size"] == 2 and summary["launcher"] == "accelerate"


@pytest.mark.processes
def test_a_peer_that_fails_stops_every_rank(tiny_root, tmp_path):
    """Rank 0 cannot create the run directory: rank 1 must not wait for it forever."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_job(["train", *tiny_overrides(tiny_root, blocker / "run")], nproc=2, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if " error: " in line]
    assert errors == [f"[rank 0] error: cannot write run directory {blocker / 'run'} (Not a directory); "
                      "set run.dir to a writable path"], result.stderr  # fmt: skip


@pytest.mark.processes
def test_missing_data_fails_before_any_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = run_job(["train", f"data.root={tmp_path / 'nothing'}", "data.download=false", f"run.dir={run_dir}"])
    assert_one_line_error(result, "MNIST files missing under", "python -m job data --root")
    assert not run_dir.exists()


@pytest.mark.processes
def test_a_non_empty_run_directory_is_left_alone(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunDir(run_dir).model.write_bytes(b"precious")
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir)])
    assert_one_line_error(result, f"run directory {run_dir} holds results (model.pt) but no checkpoint to resume")
    assert [p.name for p in run_dir.iterdir()] == ["model.pt"]
    assert RunDir(run_dir).model.read_bytes() == b"precious"


@pytest.mark.processes
def test_a_one_process_launcher_env_needs_no_master_address(tiny_root, tmp_path):
    env = clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    assert_ok(run_job(["train", *tiny_overrides(tiny_root, tmp_path / "run", "train.epochs=1")], env=env))


@pytest.mark.processes
def test_uneven_training_shards_are_announced_once(two_rank_run, tiny_root, tmp_path):
    overrides = tiny_overrides(tiny_root, tmp_path / "run", "data.train_limit=301", "train.epochs=1")
    result = run_job(["train", *overrides], nproc=2)
    assert_ok(result)
    warnings = [line for line in result.stderr.splitlines() if "do not split evenly" in line]
    assert warnings == [
        "[rank 0] 301 training samples do not split evenly over 2 ranks: 1 sample(s) repeat each epoch "
        "(DistributedSampler pads the shards), so this run is not step-for-step equal to a 1-rank run; "
        "pick data.train_limit divisible by the world size"
    ]
    assert "do not split evenly" not in two_rank_run.result.stderr, "512 samples split evenly over 2 ranks"


def test_threads_default_to_cores_per_local_process():
    from job.launch_env import LaunchEnv, cpu_threads_per_process

    env = LaunchEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, launcher="torchrun")
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads_per_process(env, environ={}) == max(1, cores // 2)
    assert cpu_threads_per_process(env, environ={"OMP_NUM_THREADS": "3"}) is None


@pytest.mark.processes
def test_evaluate_reads_training_checkpoints_too(two_rank_run, tiny_root, tmp_path):
    run_dir = two_rank_run.dir
    overrides = tiny_overrides(tiny_root, tmp_path / "unused")
    result = run_job(["evaluate", "--checkpoint", str(run_dir / "checkpoints/step-000000016.pt"), *overrides])
    assert_ok(result)
    assert json.loads(result.stdout.strip().splitlines()[-1])["correct"] == read_summary(run_dir)["correct"]


@pytest.mark.processes
def test_evaluate_refuses_bad_checkpoints_in_one_line(tiny_root, tmp_path):
    overrides = tiny_overrides(tiny_root, tmp_path / "unused")
    missing = run_job(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), *overrides])
    assert_one_line_error(missing, "nope.pt does not exist")

    wrong = tmp_path / "wrong.pt"
    state = Net().state_dict()
    state["fc2.weight"] = torch.zeros(5, 50)
    torch.save(state, wrong)
    result = run_job(["evaluate", "--checkpoint", str(wrong), *overrides])
    assert_one_line_error(result, "does not fit the model: size mismatch for fc2.weight")


@pytest.mark.parametrize("fails", [False, True], ids=["gathered", "failed"])
def test_the_gradient_hook_fails_when_its_all_gather_fails(monkeypatch, fails):
    """A timed-out or broken all-gather must fail DDP's backward at its step. `Future.then` runs its
    callback on a failed future too: the hook summed the never-filled buffers into the gradients and
    training went on (3 ranks, rank 1 stopped before step 17: the others trained steps 17-19)."""
    import torch.distributed as dist

    from job.collectives import mean_in_rank_order

    class Work:  # the all-gather's Work, done: the other ranks' parts arrived or the transport failed
        def __init__(self, parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
            self.future = torch.futures.Future()
            if fails:
                self.future.set_exception(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv"))
            else:
                for rank, part in enumerate(parts):
                    part.copy_(tensor * (rank + 1))
                self.future.set_result(parts)

        def get_future(self) -> torch.futures.Future:
            return self.future

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", lambda parts, tensor, async_op: Work(parts, tensor))
    grads = torch.tensor([2.0, 4.0])
    mean = mean_in_rank_order(None, SimpleNamespace(buffer=lambda: grads))  # DDP's GradBucket, in part
    if fails:
        with pytest.raises(RuntimeError, match="Timed out waiting 5000ms for recv"):
            mean.wait()
    else:
        assert mean.wait().tolist() == [3.0, 6.0]  # rank 0's [1, 2] + rank 1's [2, 4]


@pytest.mark.processes
@pytest.mark.parametrize("nproc", [2, 3])
def test_gloo_gradient_mean_is_exact_and_in_rank_order(nproc):
    """The gloo comm hook (all-gather + sum in rank order) gives the exact mean; at 2 ranks the
    same bits as DDP's own all-reduce, so the hook changed no 2-rank result."""
    assert_ok(run_probe("comm_hook.py", [], nproc=nproc))
