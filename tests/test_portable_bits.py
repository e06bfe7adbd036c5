"""The same bits on any x86 host: the CPU kernels are pinned at AVX2 (job/cpu_kernels.py), and
the instruction set in use is recorded with the other factors the bits depend on.

The reference digest below was computed with the pin, on an AMD EPYC with AVX-512 (2026-12-06),
and equals what that host computes with the pin off and the kernels forced down to AVX2 (the
second test): the bits an AVX2 host computes. On an AVX-512 host the first test fails when the
pin is removed; on an AVX2 host the pin changes nothing, and neither does removing it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import assert_ok, checkpoint, clean_env, read_summary, run_job, tiny_overrides, weights_digest

from job.cpu_kernels import PORTABLE_PINS
from job.run_dir import RunDir

pytestmark = pytest.mark.processes

# model.pt of the short run below, one rank, one thread (weights_digest), per torch version.
REFERENCE = {"2.14.1": "ae91f4e951fde295de3d27eacc6d9064fca2bff6e6f5f7ebcdb0514ef97b6600"}
FORCED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _env(**extra: str) -> dict[str, str]:
    env = clean_env(OMP_NUM_THREADS="1", **extra)
    for name in PORTABLE_PINS:  # the host's own kernels unless a test forces them
        if name not in extra:
            env.pop(name, None)
    return env


def _short_run(tiny_root, run_dir, *extra: str, **env: str) -> str:
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir, "train.epochs=1", *extra)], env=_env(**env))
    assert_ok(result)
    return weights_digest(run_dir)


def _reference() -> str:
    version = torch.__version__.split("+")[0]
    assert version in REFERENCE, f"no reference bits for torch {version}: add this run's digest to REFERENCE"
    return REFERENCE[version]


def _native_capability() -> str:
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True).stdout.strip()


def test_the_default_run_computes_the_avx2_reference_bits_on_any_x86_host(tiny_root, tmp_path):
    assert _short_run(tiny_root, tmp_path / "pinned") == _reference()
    assert read_summary(tmp_path / "pinned")["cpu_capability"] == "AVX2"


def test_the_reference_is_what_avx2_kernels_compute_with_the_pin_off(tiny_root, tmp_path):
    """An AVX2 host, simulated: the pin off (speed.native_cpu_kernels) and the kernels forced to AVX2."""
    digest = _short_run(tiny_root, tmp_path / "forced", "speed.native_cpu_kernels=true", **FORCED_AVX2)
    assert digest == _reference()


def test_native_kernels_record_the_hosts_instruction_set(tiny_root, tmp_path):
    native = _native_capability()
    digest = _short_run(tiny_root, tmp_path / "native", "speed.native_cpu_kernels=true")
    summary = read_summary(tmp_path / "native")
    assert summary["cpu_capability"] == native
    header = RunDir(tmp_path / "native").config.read_text().splitlines()[0]
    assert f"cpu_capability {native}" in header
    if native != "AVX2":  # an AVX-512 host: its own kernels give other bits, as documented
        assert digest != _reference()


def test_a_resume_under_another_instruction_set_warns(tiny_root, tmp_path):
    """Host-independent: the resumed half runs ATen's scalar kernels (DEFAULT), which every host has."""
    run_dir = tmp_path / "run"
    first = tiny_overrides(tiny_root, run_dir, "train.epochs=1", "checkpoint.every_steps=4")
    assert_ok(run_job(["train", *first], env=_env()))
    again = tiny_overrides(tiny_root, run_dir, "train.epochs=2")
    result = run_job(["train", *again], env=_env(ATEN_CPU_CAPABILITY="default"))
    assert_ok(result)
    assert "resuming a checkpoint written with cpu_capability=AVX2 under cpu_capability=DEFAULT" in result.stderr
    assert read_summary(run_dir)["cpu_capability"].startswith("DEFAULT")
    assert torch.load(checkpoint(run_dir, 16), weights_only=True)["environment"]["cpu_capability"].startswith("DEFAULT")


def test_every_rank_under_accelerate_runs_the_pinned_kernels(tiny_root, tmp_path):
    """The pin is set by the job in each worker, whatever started it (torchrun: test_real_mnist.py's
    README line, which only an AVX2-pinned AVX-512 host prints)."""
    result = run_job(["train", *tiny_overrides(tiny_root, tmp_path / "run", "train.epochs=1")], nproc=2,
                     launcher="accelerate", env=_env())  # fmt: skip
    assert_ok(result)
    assert read_summary(tmp_path / "run")["cpu_capability"] == "AVX2"
    assert "not the portable AVX2" not in result.stderr + result.stdout
