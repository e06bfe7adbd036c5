"""Several hosts, as a cluster's nodes are: two network namespaces wired by veth to a bridge
(tests/k8s_local/network.py), each with its own host name (UTS namespace) and its own /etc/hosts
and /etc/resolv.conf (a mount namespace with bind mounts). Each host runs the real launcher as
slurm/train.sbatch starts a node: `python -m job.launch --nnodes 2 --rdzv-backend c10d
--rdzv-endpoint FIRST:PORT --local-addr <its own address> --rdzv-conf is_host=1|0`, one process
per host, on generated digits; a run must train to the end with the bits of a 2-rank run on one
host.

The hosts' names are set up as real hosts get them wrong (issue 21, case 2): Debian's default
/etc/hosts maps the host name to 127.0.1.1; a name that does not resolve at all (no entry, and
a name server that refuses); a host with a second interface whose address the host name maps
to, which the other host cannot reach. gloo took its address from the host name and told the
other host to connect to loopback (or to the unreachable address).

Needs root (namespaces, mounts), iproute2 and util-linux.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import BIN, REPO, assert_same_weights, clean_env, kill_tree, run_job, tiny_overrides
from k8s_local.network import PREFIX, Network, ip

from job.node_address import interface_holding, route_source, talk_over_this_nodes_address

# The hosts' bridge and addresses are fixed (tests/k8s_local/network.py): under make test's
# worker processes (pytest-xdist --dist loadgroup) these tests run one after another, in one worker.
pytestmark = pytest.mark.xdist_group("network-namespaces")

RDZV_PORT = 29400
OTHER_NET = "192.168.77"  # the second interface's network (case: the host name maps to it)


@dataclass
class Host:
    name: str
    netns: str
    addr: str
    etc: Path  # this host's hosts and resolv.conf

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this host: its network namespace, its host name, its /etc/hosts and resolv.conf."""
        become = (
            'hostname "$0" && mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/resolv.conf" /etc/resolv.conf'
            ' && shift && exec "$@"'
        )
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount", "sh", "-c", become,
                self.name, str(self.etc), *argv]  # fmt: skip


@pytest.fixture
def two_hosts(tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, iproute2 (ip) and util-linux (unshare)")
    net = Network(f"{PREFIX}{os.getpid()}-hosts")
    try:
        net.create()
        hosts = []
        for name in ("node-a", "node-b"):
            netns = f"{net.prefix}-{name}"
            etc = tmp_path / name
            etc.mkdir()
            # A name server that refuses at once: a name missing from /etc/hosts does not resolve,
            # without waiting for the host's resolver (unreachable from the namespace).
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")
            hosts.append(Host(name, netns, net.add_pod(netns), etc))
        yield hosts
    finally:
        net.destroy()


def write_hosts(host: Host, *entries: str) -> None:
    (host.etc / "hosts").write_text("\n".join(["127.0.0.1 localhost", "::1 localhost", *entries]) + "\n")


def launch_on(host: Host, first: Host, overrides: list[str], local_addr: bool, launcher: str) -> list[str]:
    """The node command slurm/train.sbatch runs (PET_LOCAL_ADDR and PET_RDZV_CONF there are
    torchrun's environment forms of --local-addr and --rdzv-conf), or the same with plain torchrun."""
    start = [sys.executable, "-m", "job.launch"] if launcher == "job.launch" else [str(BIN / "torchrun")]
    argv = [*start, "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{first.addr}:{RDZV_PORT}", "--rdzv-id", "hosts",
            "--rdzv-conf", f"is_host={int(host is first)}", "--max-restarts", "0"]  # fmt: skip
    if local_addr:
        argv += ["--local-addr", host.addr]
    return host.command([*argv, "-m", "job", "train", *overrides])


def run_on_both(
    hosts: list[Host],
    overrides: list[str],
    local_addr: bool = True,
    launcher: str = "job.launch",
    first_only: bool = False,
) -> list[tuple[int, str]]:
    """Each host's (exit status, output); with `first_only`, the first host's alone, the others
    ended once it has exited (their agents would otherwise wait out the grace for a store host gone,
    job/launch.py's STORE_HOST_GONE_GRACE_S)."""
    env = clean_env(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # as train.sbatch
    first = hosts[0]
    procs = [
        subprocess.Popen(
            launch_on(host, first, overrides, local_addr, launcher),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for host in hosts
    ]
    try:
        return [(proc.wait(timeout=240), proc.stdout.read()) for proc in procs[: 1 if first_only else None]]
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()


@pytest.fixture(scope="module")
def one_host_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run as 2 ranks on one host: the bits the two-host runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("one-host") / "run"
    result = run_job(["train", *tiny_overrides(tiny_root, run_dir)], nproc=2, launcher="job.launch",
                     env=clean_env(OMP_NUM_THREADS="1"))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def second_interface(host: Host, addr: str) -> None:
    """A second interface with `addr`, which no other host can reach (a veth pair inside the host)."""
    ip("-n", host.netns, "link", "add", "mgmt0", "type", "veth", "peer", "name", "mgmt1")
    ip("-n", host.netns, "addr", "add", f"{addr}/24", "dev", "mgmt0")
    for link in ("mgmt0", "mgmt1"):
        ip("-n", host.netns, "link", "set", link, "up")


@pytest.mark.processes
@pytest.mark.parametrize(
    ("names", "launcher"),
    [
        pytest.param("debian", "job.launch", id="host-name-is-127.0.1.1"),  # Debian's default /etc/hosts
        pytest.param("unresolvable", "job.launch", id="host-name-does-not-resolve"),
        pytest.param("other-interface", "job.launch", id="host-name-is-an-unreachable-interface"),
        pytest.param("debian", "torchrun", id="host-name-is-127.0.1.1-plain-torchrun"),  # the fix is in the ranks
    ],
)
def test_two_hosts_train_whatever_their_host_names_resolve_to(
    two_hosts: list[Host], tiny_root: Path, tmp_path: Path, one_host_run: Path, names: str, launcher: str
) -> None:
    for host in two_hosts:
        if names == "debian":
            write_hosts(host, f"127.0.1.1 {host.name}")
        elif names == "unresolvable":
            write_hosts(host)
        else:
            mgmt = f"{OTHER_NET}.{two_hosts.index(host) + 2}"
            second_interface(host, mgmt)
            write_hosts(host, f"{mgmt} {host.name}")
    run_dir = tmp_path / "run"
    results = run_on_both(two_hosts, tiny_overrides(tiny_root, run_dir, "dist.timeout_s=60"), launcher=launcher)
    for host, (code, output) in zip(two_hosts, results, strict=True):
        assert code == 0, f"{host.name} exited {code}:\n{output}"
    assert_same_weights(run_dir, one_host_run)


@pytest.mark.processes
def test_a_node_whose_address_would_be_loopback_stops_with_one_line(
    two_hosts: list[Host], tiny_root: Path, tmp_path: Path
) -> None:
    """No --local-addr on Debian-style hosts with no route beyond their own network: torch names the
    first node by its host name (the workers' MASTER_ADDR), which is loopback there, and nothing
    else says which address the other host reaches it at. That node says so and exits 2."""
    first, second = two_hosts
    write_hosts(first, f"127.0.1.1 {first.name}", f"{second.addr} {second.name}")
    write_hosts(second, f"127.0.1.1 {second.name}", f"{first.addr} {first.name}")
    for host in two_hosts:
        ip("-n", host.netns, "route", "del", "default")
    run_dir = tmp_path / "run"
    ((code, output),) = run_on_both(
        two_hosts, tiny_overrides(tiny_root, run_dir, "dist.timeout_s=60"), local_addr=False, first_only=True
    )
    assert code == 2, output
    errors = [line for line in output.splitlines() if "error: " in line]
    assert len(errors) == 1, output
    assert "loopback" in errors[0] and "--local-addr" in errors[0] and "GLOO_SOCKET_IFNAME" in errors[0], errors[0]
    assert "Traceback" not in output
    assert not run_dir.exists()


# --- in this process: the address and interface rules --------------------------------------


def test_the_route_to_an_address_of_this_host_leaves_from_that_address() -> None:
    """On the node that hosts the store, MASTER_ADDR is its own address: the source is the same."""
    assert route_source("127.0.0.1") == "127.0.0.1"
    assert interface_holding("127.0.0.1") == "lo"
    assert route_source("name.invalid") is None  # RFC 6761: never resolves


def test_interfaces_the_user_named_are_kept() -> None:
    environ = {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "=ib0"}
    talk_over_this_nodes_address("127.0.0.1", environ)
    assert environ == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "=ib0"}


@pytest.mark.processes
def test_without_a_route_beyond_loopback_the_node_has_no_address() -> None:
    """A MASTER_ADDR that is loopback here, and (in a fresh network namespace) no default route."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and util-linux (unshare)")
    code = (
        "from job.node_address import talk_over_this_nodes_address as t\n"
        "try:\n    t('127.0.1.1', {})\nexcept Exception as e:\n    print(type(e).__name__, e)"
    )
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.startswith("LaunchError this node's address for the other hosts would be loopback"), out
