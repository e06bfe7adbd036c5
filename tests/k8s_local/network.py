"""The network (root): a bridge in a network namespace of its own stands in for the node, with a
veth into each pod's network namespace; and the clean-up of namespaces a crashed run left."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

# Every namespace this module creates is named PREFIX<pid of the creating process>-...: leftovers
# of a crashed run are recognised by a dead pid, without touching a concurrent run's.
PREFIX = "k8sl"
SUBNET = "10.244.0"  # inside the bridge's own namespace: never routed on the host


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def netns_names() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def kill_netns_processes(name: str) -> None:
    """SIGKILL every process in a network namespace at once (a pod's whole tree: every process
    of a pod is in its network namespace), and wait until they are gone."""
    pids = [int(pid) for pid in ip("netns", "pids", name).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
            time.sleep(0.01)


def delete_netns(name: str) -> None:
    kill_netns_processes(name)  # a namespace outlives its name while a process is still in it
    ip("netns", "delete", name)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def remove_leftovers() -> list[str]:
    """Namespaces (and the processes in them) of runs whose creating process is gone."""
    removed = []
    for name in netns_names():
        match = re.match(rf"{PREFIX}(\d+)-", name)
        if match and not Path(f"/proc/{match[1]}").exists():
            delete_netns(name)
            removed.append(name)
    return removed


class Network:
    """The "node": a bridge in a network namespace of its own, and one veth from it into each pod's
    network namespace (eth0, a pod IP). Nothing is added to the host's own network namespace."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.node = f"{prefix}-node"
        self.host_ip = f"{SUBNET}.1"
        self._pods = 0
        self._had_netns_mount = _is_mount_point("/run/netns")

    def create(self) -> None:
        ip("netns", "add", self.node)
        ip("-n", self.node, "link", "add", "br0", "type", "bridge")
        ip("-n", self.node, "addr", "add", f"{self.host_ip}/24", "dev", "br0")
        ip("-n", self.node, "link", "set", "br0", "up")

    def add_pod(self, netns: str) -> str:
        """A new network namespace wired to the bridge; returns its IP (a new one per pod, as in a cluster)."""
        self._pods += 1
        addr, peer = f"{SUBNET}.{self._pods + 1}", f"veth{self._pods}"
        ip("netns", "add", netns)
        ip("-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", self.node)
        ip("-n", netns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "route", "add", "default", "via", self.host_ip)
        ip("-n", self.node, "link", "set", peer, "master", "br0", "up")
        return addr

    def destroy(self) -> None:
        """Every namespace of this run, the pods' too: what a failed pod deletion left is gone as well."""
        for name in netns_names():
            if name.startswith(f"{self.prefix}-"):
                delete_netns(name)
        # `ip netns add` makes /run/netns a mount point the first time; undo that once it is unused.
        if not self._had_netns_mount and _is_mount_point("/run/netns") and not os.listdir("/run/netns"):
            subprocess.run(["umount", "/run/netns"], check=True)


def _is_mount_point(path: str) -> bool:
    return any(line.split()[1] == path for line in Path("/proc/mounts").read_text().splitlines())
