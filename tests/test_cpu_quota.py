"""Threads per rank under a container's CPU quota (job/cpu_quota.py): cgroup v1 and v2 files
laid out as the kernel shows them, and a real cgroup limited to 0.5 CPU around a real run."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import REPO, assert_ok, clean_env, read_summary, tiny_overrides

from job.cpu_quota import affinity_cores, cgroup_cpu_limit, threads_per_process

V1_MOUNTS = """\
25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
32 25 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
"""
V1_CPU = "sys/fs/cgroup/cpu,cpuacct"
V2_MOUNTS = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n"


def fake_host(tmp_path: Path, cgroup: str, mountinfo: str, files: dict[str, str]) -> Path:
    """A root directory holding proc/self/{cgroup,mountinfo} and the cgroup files `files`
    (paths relative to the root, e.g. sys/fs/cgroup/cpu.max)."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_cgroup_v2_half_a_cpu_is_one_thread(tmp_path: Path) -> None:
    # A Kubernetes pod with resources.limits.cpu: 500m (cgroup namespace: the pod's own cgroup is "/").
    root = fake_host(tmp_path, "0::/\n", V2_MOUNTS, {"sys/fs/cgroup/cpu.max": "50000 100000\n"})
    assert cgroup_cpu_limit(root) == 0.5
    assert threads_per_process(1, environ={}, root=root) == (1, "cgroup CPU quota 0.5")
    assert threads_per_process(2, environ={}, root=root)[0] == 1  # at least 1


def test_cgroup_v2_quota_divides_over_local_processes_and_ancestors_count(tmp_path: Path) -> None:
    # No cgroup namespace: the process sits deep in the hierarchy; a parent's limit is the tighter one.
    root = fake_host(
        tmp_path,
        "0::/kubepods/pod1/ctr\n",
        V2_MOUNTS,
        {
            "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",
            "sys/fs/cgroup/kubepods/pod1/cpu.max": "150000 50000\n",  # 3 CPUs
            "sys/fs/cgroup/kubepods/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == 3.0
    if affinity_cores() > 3:
        assert threads_per_process(2, environ={}, root=root) == (1, "cgroup CPU quota 3")
        assert threads_per_process(1, environ={}, root=root) == (3, "cgroup CPU quota 3")


def test_cgroup_v2_without_a_quota_uses_the_cores(tmp_path: Path) -> None:
    root = fake_host(tmp_path, "0::/\n", V2_MOUNTS, {"sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root) is None
    cores = affinity_cores()
    assert threads_per_process(2, environ={}, root=root) == (max(1, cores // 2), f"{cores} CPU cores")


def test_quota_above_the_cores_is_capped_by_affinity(tmp_path: Path) -> None:
    cores = affinity_cores()
    quota = f"{(cores + 4) * 100000} 100000\n"
    root = fake_host(tmp_path, "0::/\n", V2_MOUNTS, {"sys/fs/cgroup/cpu.max": quota})
    assert threads_per_process(1, environ={}, root=root) == (cores, f"{cores} CPU cores")


def test_cgroup_v1_quota_under_a_container_mount_root(tmp_path: Path) -> None:
    # Docker on cgroup v1: the container's cgroup /docker/abc is mounted as the hierarchy's root.
    mounts = V1_MOUNTS.replace("0:27 / /sys/fs/cgroup/cpu,cpuacct", "0:27 /docker/abc /sys/fs/cgroup/cpu,cpuacct")
    root = fake_host(
        tmp_path,
        "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        mounts,
        {f"{V1_CPU}/cpu.cfs_quota_us": "50000\n", f"{V1_CPU}/cpu.cfs_period_us": "100000\n"},
    )
    assert cgroup_cpu_limit(root) == 0.5
    assert threads_per_process(1, environ={}, root=root) == (1, "cgroup CPU quota 0.5")


def test_cgroup_v1_without_a_quota(tmp_path: Path) -> None:
    root = fake_host(
        tmp_path,
        "4:cpu,cpuacct:/\n",
        V1_MOUNTS,
        {f"{V1_CPU}/cpu.cfs_quota_us": "-1\n", f"{V1_CPU}/cpu.cfs_period_us": "100000\n"},
    )
    assert cgroup_cpu_limit(root) is None


def test_omp_num_threads_decides_over_a_quota(tmp_path: Path) -> None:
    root = fake_host(tmp_path, "0::/\n", V2_MOUNTS, {"sys/fs/cgroup/cpu.max": "50000 100000\n"})
    assert threads_per_process(1, environ={"OMP_NUM_THREADS": "4"}, root=root) == (None, "OMP_NUM_THREADS")


def test_unreadable_cgroup_files_are_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None  # no /proc at all
    root = fake_host(tmp_path, "0::/\n", V2_MOUNTS, {"sys/fs/cgroup/cpu.max": "garbage\n"})
    assert cgroup_cpu_limit(root) is None


CPU_V1 = Path("/sys/fs/cgroup/cpu")


def _half_cpu_cgroup() -> Path:
    """A new cgroup (v1 cpu controller, as on this machine) limited to 0.5 CPU; skips where this
    sandbox cannot create one (not root, or no writable cpu hierarchy)."""
    if os.geteuid() != 0 or not (CPU_V1 / "cpu.cfs_quota_us").exists():
        pytest.skip("needs root and a cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu to create a cgroup")
    group = CPU_V1 / f"mnist-ddp-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("50000")
    except OSError as e:
        if group.exists():
            group.rmdir()
        pytest.skip(f"cannot create a cgroup here ({e.strerror})")
    return group


def _in_cgroup(group: Path) -> str:
    """A shell prefix that moves the shell into `group` before it execs the command."""
    return f"echo $$ > {group / 'cgroup.procs'} && exec "


@pytest.mark.processes
def test_train_in_a_half_cpu_cgroup_uses_one_thread(tiny_root: Path, tmp_path: Path) -> None:
    """The issue's case: `python -m job train` in a cgroup limited to 0.5 CPU on a host with more
    cores picked 2 threads and was throttled; now 1, from the quota, and `make`'s THREADS agrees."""
    group = _half_cpu_cgroup()
    try:
        run_dir = tmp_path / "run"
        args = [*tiny_overrides(tiny_root, run_dir, "train.epochs=1")]
        command = _in_cgroup(group) + " ".join([sys.executable, "-m", "job", "train", *args])
        result = subprocess.run(
            ["sh", "-c", command], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300
        )
        assert_ok(result)
        summary = read_summary(run_dir)
        assert summary["threads_per_rank"] == 1
        assert summary["threads_from"] == "cgroup CPU quota 0.5"
        assert "1 thread(s) per rank (cgroup CPU quota 0.5)" in result.stderr + result.stdout
        make = subprocess.run(
            ["sh", "-c", _in_cgroup(group) + "make --no-print-directory -n train-local NPROC=1"],
            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" in make.stdout, make.stdout + make.stderr
    finally:
        group.rmdir()  # its processes have exited: an empty cgroup can be removed
