"""The CPU kernels' instruction set, pinned so that the same run gives the same bits on any x86 host.

torch picks its CPU kernels by what the processor offers, in three libraries, each with its own
switch read from the environment once, when the library first runs a kernel:
- ATen's vectorised kernels (softmax, dropout, elementwise, SGD): `ATEN_CPU_CAPABILITY`
  (c10 DispatchStub, `compute_cpu_capability`);
- oneDNN's convolutions: `ONEDNN_MAX_CPU_ISA` (oneDNN's `get_max_cpu_isa`);
- MKL's matrix products (the linear layers): `MKL_ENABLE_INSTRUCTIONS`.
An AVX-512 kernel adds in another order than an AVX2 one, so a run on an AVX-512 host ends with
other weights than the same run on an AVX2 host. Measured 2026-12-06 on an AMD EPYC with AVX-512,
torch 2.14.1, one rank, 32 steps on generated digits: four different sets of weights with no pin,
ATen's alone, oneDNN's alone and both; MKL's cap changed nothing there (MKL takes its AVX2 path on
AMD processors) but keeps Intel AVX-512 hosts on the path an AVX2 host takes. With the pins the
seed recipe prints the README's line on AVX-512 and AVX2 hosts alike.

The pins are set in the job's own process before it imports torch (job/__main__.py), so every
launcher (torchrun, accelerate, the image, Kubernetes, Slurm) gets them. A variable the user set
is kept. Only x86-64 hosts with AVX2 and FMA are pinned: another processor (ARM, an x86 without
AVX2) computes with its own kernels, and its bits differ, recorded as `cpu_capability`.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping
from pathlib import Path

PORTABLE_PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
"""The variables and the values that cap each library at AVX2, the instruction set every x86-64
host the recipe targets has."""

PORTABLE_CAPABILITY = "AVX2"
"""ATen's name for the capability the pins select (`torch.backends.cpu.get_cpu_capability()`)."""


def pinnable(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this host is x86-64 with AVX2 and FMA, the kernels the pins select."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx2" in flags and "fma" in flags


def pin_cpu_kernels(native: bool, environ: MutableMapping[str, str] = os.environ) -> None:
    """Cap the CPU kernels at AVX2 (unless `native`, or the host cannot run them): must run before
    torch runs its first CPU kernel, which reads the variables once. Variables already set stay."""
    if native or not pinnable():
        return
    for name, value in PORTABLE_PINS.items():
        environ.setdefault(name, value)


def cpu_capability() -> str:
    """The instruction set ATen's CPU kernels use in this process, e.g. AVX2, AVX512, DEFAULT
    (no vector kernels), or an ARM name such as SVE256; `+oneDNN<=X` when oneDNN is capped apart."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return capability if onednn is None or onednn.upper() == capability else f"{capability}+oneDNN<={onednn.upper()}"


def pin_missed(native: bool) -> bool:
    """Whether the pin was asked for on a host it applies to but torch runs other kernels anyway:
    torch was imported and ran a kernel before the job set the variables (a program that imports
    the job after torch), or the user set other values."""
    if native or not pinnable() or "torch" not in sys.modules:
        return False
    return cpu_capability() != PORTABLE_CAPABILITY
