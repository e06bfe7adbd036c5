"""The device a rank computes on: the choice (dist.device, dist.backend), why CUDA is not usable
when it was asked for, and what torch.compile needs on that device.

Asking for GPUs and not getting them is bad input (exit 2) with the cause in the line, never
a silent fall back to the CPU: a GPU job that trains on CPU and exits 0 wastes hours.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import shutil
import subprocess
import sysconfig
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from job.config import DistConfig
from job.errors import LaunchEnvError, LaunchError, message_line

DRIVER_DIRS = ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib")
"""Where Kubernetes GPU device plugins (GKE's, the NVIDIA one without the container toolkit) mount
the driver's libraries; the image puts them on LD_LIBRARY_PATH."""


def choose_backend_and_device(cfg: DistConfig, local_rank: int) -> tuple[str, torch.device]:
    """The collective backend and this rank's device.

    dist.device auto = the GPU numbered LOCAL_RANK when CUDA is usable and the backend is not
    gloo, else the CPU; dist.backend auto = nccl on CUDA, gloo on the CPU. nccl takes one GPU
    per process; gloo with dist.device=cuda lets ranks share GPUs (rank r on GPU r mod count).
    Raises LaunchError when CUDA is asked for (dist.device=cuda or dist.backend=nccl) and not
    usable, naming the cause.
    """
    if cfg.device == "cpu" and cfg.backend == "nccl":
        raise LaunchError("dist.backend=nccl runs on GPUs only but dist.device=cpu; use dist.backend=gloo or auto")
    wants_cuda = cfg.device == "cuda" or cfg.backend == "nccl"
    if cfg.device == "auto" and not wants_cuda:
        wants_cuda = cfg.backend != "gloo" and torch.cuda.is_available()
    if not wants_cuda:
        return ("gloo" if cfg.backend == "auto" else cfg.backend), torch.device("cpu")
    reason = cuda_unavailable_reason()
    if reason is not None:
        asked = "dist.device=cuda" if cfg.device == "cuda" else "dist.backend=nccl"
        raise LaunchError(f"{asked} asks for GPUs but CUDA is not usable here: {reason}; or set dist.device=cpu")
    backend = "nccl" if cfg.backend == "auto" else cfg.backend
    count = torch.cuda.device_count()
    if backend == "nccl" and local_rank >= count:
        raise LaunchEnvError(
            f"LOCAL_RANK={local_rank} but only {count} GPU(s) are visible and NCCL takes one GPU per process: "
            "start at most one process per GPU (torchrun --nproc-per-node), or share GPUs over dist.backend=gloo"
        )
    return backend, torch.device("cuda", local_rank % count)


def cuda_unavailable_reason(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why torch cannot use a GPU in this process, as a phrase with the fix; None when it can."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA: install a CUDA build (the project's pins are)"
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    with warnings.catch_warnings(record=True) as caught:
        # torch reports a driver it cannot use (too old for the wheels, no devices) as a warning.
        warnings.simplefilter("always")
        usable = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if usable:
        return None
    said = [message_line(w.message) for w in caught if "CUDA" in str(w.message) or "NVIDIA" in str(w.message)]
    if said:
        return said[0]
    if ctypes.util.find_library("cuda") is None and not any(Path(d, "libcuda.so.1").exists() for d in DRIVER_DIRS):
        return (
            "the NVIDIA driver (libcuda.so.1) is not found: on a host install the driver; in a container run it "
            "with the NVIDIA runtime (docker --gpus all; Kubernetes runtimeClassName: nvidia) or mount the "
            "driver under /usr/local/nvidia/lib64"
        )
    return "the driver sees no GPU (check nvidia-smi; under MIG, CUDA_VISIBLE_DEVICES must name MIG devices)"


def compile_toolchain_missing(device: torch.device, environ: Mapping[str, str] = os.environ) -> list[str]:
    """What torch.compile's code generators need and this host lacks, one phrase each (empty: ready).

    Inductor builds C++ for the CPU and Python extensions on both devices (a C++ compiler,
    Python.h); on CUDA, Triton builds its launcher with a C compiler and links libcuda.so.1,
    which it looks up in `ldconfig -p`, TRITON_LIBCUDA_PATH or LD_LIBRARY_PATH
    (triton/runtime/build.py `_find_compiler`, triton/backends/nvidia/driver.py `libcuda_dirs`).
    """
    missing = []
    if not _first_on_path(environ.get("CXX"), "g++", "c++", "clang++"):
        missing.append("a C++ compiler (apt-get install g++)")
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        missing.append("Python.h (apt-get install python3-dev)")
    if device.type == "cuda":
        if not _first_on_path(environ.get("CC"), "gcc", "clang", "cc"):
            missing.append("a C compiler for Triton (apt-get install gcc)")
        if not _libcuda_for_triton(environ):
            missing.append("libcuda.so.1 in `ldconfig -p` (run ldconfig, or set TRITON_LIBCUDA_PATH to its folder)")
    return missing


def _first_on_path(*names: str | None) -> str | None:
    return next((path for name in names if name and (path := shutil.which(name))), None)


def _libcuda_for_triton(environ: Mapping[str, str]) -> bool:
    folders = [environ["TRITON_LIBCUDA_PATH"]] if environ.get("TRITON_LIBCUDA_PATH") else []
    try:
        cache = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        cache = ""
    folders += [os.path.dirname(line.split()[-1]) for line in cache.splitlines() if "libcuda.so.1" in line]
    folders += environ.get("LD_LIBRARY_PATH", "").split(":")
    return any(folder and Path(folder, "libcuda.so.1").exists() for folder in folders)


def quiet_compiler() -> None:
    """torch.compile's warnings at level ERROR: it reports what it skips and where it found its
    tools on every rank (pages under DDP), none of which the user can act on. TORCH_LOGS (e.g.
    TORCH_LOGS=+dynamo) brings them back: then this changes nothing."""
    if os.environ.get("TORCH_LOGS"):
        return
    torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR, aot=logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
