"""CPU threads per process from what this process may really use: its CPU affinity and its
cgroup's CPU quota (a container's CPU limit: Kubernetes `resources.limits.cpu`, `docker run
--cpus`, Slurm's cgroup plugin).

A quota caps CPU time per period, not the cores a process sees: a container limited to 0.5 CPU
still sees every core of the host, and one thread per core is then throttled most of each
period (measured here: 2 threads under a 0.5 CPU quota trained 2x slower than 1 thread).

`python -m job.cpu_quota N` prints the threads for each of N processes on this host: the
Makefile's THREADS, so that `make train-local` and the job decide alike.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path


def affinity_cores() -> int:
    """The cores the scheduler lets this process run on (os.cpu_count() where affinity is unknown)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cgroup_cpu_limit(root: Path = Path("/")) -> float | None:
    """The CPUs this process's cgroups allow it per period (quota / period, e.g. 0.5 or 2.0; the
    smallest over its cgroup and the ancestors visible to it), or None when none sets a quota.

    Reads /proc/self/cgroup (which cgroup) and /proc/self/mountinfo (where its hierarchy is
    mounted) under `root`, then cgroup v2's `cpu.max` ("max 100000", "50000 100000") or v1's
    `cpu.cfs_quota_us` (-1: none) and `cpu.cfs_period_us`. Files that are missing or unreadable
    count as no quota: a limit nobody can read limits nothing here.
    """
    try:
        membership = (root / "proc/self/cgroup").read_text().splitlines()
        mounts = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in membership:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # cgroup v2: "0::/path"
            mount = _mount(mounts, lambda fstype, options: fstype == "cgroup2")
            read = _v2_limit
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            mount = _mount(mounts, lambda fstype, options: fstype == "cgroup" and "cpu" in options.split(","))
            read = _v1_limit
        else:
            continue
        if mount is None:
            continue
        mount_root, mount_point = mount
        for directory in _own_and_ancestors(root / mount_point.lstrip("/"), mount_root, path):
            limit = read(directory)
            if limit is not None:
                limits.append(limit)
    return min(limits, default=None)


def _mount(mounts: list[str], wanted) -> tuple[str, str] | None:  # noqa: ANN001 (a predicate)
    """(root within the hierarchy, mount point) of the first mountinfo line `wanted(fstype, super
    options)` accepts. mountinfo: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS] - FSTYPE SOURCE SUPER`."""
    for line in mounts:
        fields, sep, tail = line.partition(" - ")
        head, rest = fields.split(), tail.split()
        if sep and len(head) >= 5 and len(rest) >= 3 and wanted(rest[0], rest[2]):
            return _unescape(head[3]), _unescape(head[4])
    return None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040...)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _own_and_ancestors(mount_point: Path, mount_root: str, path: str) -> list[Path]:
    """This process's cgroup directory and its ancestors up to the mount point. Inside a
    container the hierarchy is usually mounted from the container's own cgroup (mount root
    /kubepods/.../abc, the same as /proc/self/cgroup's path): that prefix is not in the mount."""
    relative = path
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root.rstrip("/") + "/")):
        relative = path[len(mount_root.rstrip("/")) :]
    parts = [part for part in relative.split("/") if part and part != ".."]
    return [mount_point.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def threads_per_process(
    local_processes: int, environ: Mapping[str, str] = os.environ, root: Path = Path("/")
) -> tuple[int | None, str]:
    """(threads for each of `local_processes` processes on this host, what decided it): None and
    "OMP_NUM_THREADS" when that variable is set (torch then follows it); otherwise the usable CPUs
    (the cgroup quota, capped by the affinity cores) divided by the processes, rounded down, at
    least 1."""
    if environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    cores, quota = affinity_cores(), cgroup_cpu_limit(root)
    if quota is not None and quota < cores:
        return max(1, math.floor(quota / local_processes)), f"cgroup CPU quota {quota:g}"
    return max(1, cores // local_processes), f"{cores} CPU cores"


if __name__ == "__main__":
    try:
        processes = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    except ValueError:
        processes = 0
    if processes < 1:
        sys.exit("usage: python -m job.cpu_quota [PROCESSES >= 1]")
    threads, _ = threads_per_process(processes, environ={})
    print(threads)
