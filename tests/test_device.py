"""The device choice and the GPU faults a first CUDA run would hit, tested on the CPU.

A fake CUDA (torch's FakeTensorMode: tensors that say cuda:0 and hold no data) and a
patched torch.cuda stand in for a GPU; `make gpu-check` runs the same paths on a real one.
"""

from __future__ import annotations

import io
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_one_line_error, run_job, tiny_overrides
from torch._subclasses.fake_tensor import FakeTensorMode

from job import device as device_module
from job import process_group
from job.checkpoint import to_cpu
from job.config import DistConfig
from job.device import choose_backend_and_device, compile_toolchain_missing, cuda_unavailable_reason
from job.errors import LaunchEnvError, LaunchError
from job.model import Net
from job.seeding import configure_numerics
from job.train import Trainer


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this host's torch sees `n` usable GPUs."""

    def have(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.version, "cuda", "13.0")

    return have


def choose(device: str = "auto", backend: str = "auto", local_rank: int = 0) -> tuple[str, torch.device]:
    return choose_backend_and_device(DistConfig(device=device, backend=backend), local_rank)


def test_auto_is_the_cpu_and_gloo_without_gpus(gpus):
    gpus(0)
    assert choose() == ("gloo", torch.device("cpu"))


def test_auto_is_the_local_rank_gpu_and_nccl_with_gpus(gpus):
    gpus(2)
    assert choose(local_rank=1) == ("nccl", torch.device("cuda", 1))


def test_gloo_with_auto_device_stays_on_the_cpu_even_with_gpus(gpus):
    """The CPU test suite asks for gloo; on a GPU host it must not silently move to the GPUs."""
    gpus(4)
    assert choose(backend="gloo", local_rank=3) == ("gloo", torch.device("cpu"))
    assert choose(device="cpu", local_rank=3) == ("gloo", torch.device("cpu"))


def test_gloo_on_cuda_lets_ranks_share_a_gpu_and_nccl_does_not(gpus):
    gpus(1)
    assert choose(device="cuda", backend="gloo", local_rank=1) == ("gloo", torch.device("cuda", 0))
    with pytest.raises(LaunchEnvError, match="LOCAL_RANK=1 but only 1 GPU"):
        choose(device="cuda", local_rank=1)


@pytest.mark.parametrize(("device", "backend"), [("cuda", "auto"), ("auto", "nccl"), ("cuda", "gloo")])
def test_asking_for_gpus_without_usable_cuda_is_bad_input_naming_the_cause(gpus, device, backend):
    gpus(0)
    with pytest.raises(LaunchError, match="asks for GPUs but CUDA is not usable here: .*; or set dist.device=cpu"):
        choose(device=device, backend=backend)


def test_nccl_on_the_cpu_is_refused():
    with pytest.raises(LaunchError, match="dist.backend=nccl runs on GPUs only"):
        choose(device="cpu", backend="nccl")


def test_the_cause_names_a_cpu_build_hidden_gpus_an_old_driver_or_a_missing_driver(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "built without CUDA" in cuda_unavailable_reason({})
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in cuda_unavailable_reason({"CUDA_VISIBLE_DEVICES": ""})

    def old_driver() -> bool:
        import warnings

        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old (found version 11040).", stacklevel=1
        )
        return False

    monkeypatch.setattr(torch.cuda, "is_available", old_driver)
    assert "driver on your system is too old" in cuda_unavailable_reason({})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(device_module, "DRIVER_DIRS", ())
    assert "/usr/local/nvidia/lib64" in cuda_unavailable_reason({})


@pytest.mark.processes
def test_dist_device_cuda_without_cuda_is_one_line_and_exit_2(tiny_root, tmp_path):
    """This machine has a CUDA build of torch and no GPU: the real path, not a patched one."""
    run_dir = tmp_path / "run"
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, "dist.device=cuda")])
    assert result.returncode == 2
    assert_one_line_error(result, "dist.device=cuda asks for GPUs but CUDA is not usable here")
    assert not run_dir.exists()


def test_compile_toolchain_for_cuda_needs_a_c_compiler_python_h_and_libcuda(monkeypatch, tmp_path):
    monkeypatch.setattr(device_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(device_module.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=""))
    missing = compile_toolchain_missing(torch.device("cuda", 0), environ={})
    assert any("C++ compiler" in m for m in missing)
    assert any("C compiler for Triton" in m for m in missing)
    assert any("libcuda.so.1" in m for m in missing)
    (tmp_path / "libcuda.so.1").touch()
    monkeypatch.setattr(device_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert compile_toolchain_missing(torch.device("cuda", 0), environ={"TRITON_LIBCUDA_PATH": str(tmp_path)}) == [
        m for m in compile_toolchain_missing(torch.device("cpu")) if "Python.h" in m
    ]
    assert not [m for m in compile_toolchain_missing(torch.device("cpu")) if "compiler" in m]


def test_checkpoints_and_model_files_hold_cpu_tensors_when_training_ran_on_a_gpu():
    with FakeTensorMode():
        with torch.device("cuda"):
            net = Net()
            momentum = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}
        assert next(net.parameters()).device.type == "cuda"
        weights = Trainer.model_state(SimpleNamespace(model=net))
        optimizer = to_cpu(momentum)
    assert {t.device.type for t in weights.values()} == {"cpu"}
    assert optimizer["state"][0]["momentum_buffer"].device.type == "cpu"
    assert optimizer["param_groups"] == [{"lr": 0.1}]


def test_a_cpu_state_saved_loads_without_map_location():
    buffer = io.BytesIO()
    torch.save(Trainer.model_state(SimpleNamespace(model=Net())), buffer)
    buffer.seek(0)
    assert all(t.device.type == "cpu" for t in torch.load(buffer, weights_only=True).values())


def test_the_side_group_waits_dist_timeout_s_not_torchs_30_minutes(monkeypatch):
    made = {}
    monkeypatch.setattr(process_group.dist, "new_group", lambda **kwargs: made.update(kwargs) or "group")
    assert process_group.control_group("nccl", timedelta(seconds=42)) == "group"
    assert made == {"backend": "gloo", "timeout": timedelta(seconds=42)}
    assert process_group.control_group("gloo", timedelta(seconds=42)) is None


def test_tf32_is_off_unless_asked_for():
    try:
        configure_numerics(deterministic=False, tf32=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        configure_numerics(deterministic=False, tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        configure_numerics(deterministic=False, tf32=False)
        torch.backends.cudnn.benchmark = False
