"""What a run opens to the network: a run whose processes are all on this host listens on
loopback only (docs/LAUNCHING.md: What listens where; job/loopback.py).

The launches are the one `make train-local` runs, on generated digits; the tests read the listening
sockets of the launcher and its workers while they train. Where this machine's name resolves to
127.0.0.1 (as here), gloo would listen on loopback by luck: as root, one case gives the launch a
host name that resolves to a LAN address of this machine, as on most laptops and servers. The
tests without the processes marker check, in this process, each place torch creates a store and
the rules that decide what counts as local.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch.distributed.run as torchrun
from helpers import REPO, clean_env, kill_tree, tiny_overrides
from torch.distributed import DistNetworkError
from torch.distributed.elastic.rendezvous import RendezvousParameters, c10d_rendezvous_backend, static_tcp_rendezvous
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

from job import launch, torch_private
from job.loopback import all_ranks_here, is_loopback, loopback_address, talk_over_loopback, tcp_store

LAUNCH = [sys.executable, "-m", "job.launch", "--standalone", "--nproc-per-node", "2"]  # as make train-local


def listening_sockets(root: psutil.Process) -> list[tuple[str, int, str, int]]:
    """(process name, pid, address, port) of every listening TCP socket of `root` and its children."""
    found = []
    for process in (root, *root.children(recursive=True)):
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.append((process.name(), process.pid, conn.laddr.ip, conn.laddr.port))
    return found


def sockets_while_training(cmd: list[str], env: dict[str, str]) -> list[tuple[str, int, str, int]]:
    """The listening sockets of the launch `cmd` once it logs its first step (every rank has joined
    the process group); the launch must then finish with exit 0."""
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = []
        for line in launcher.stdout:
            output.append(line)
            if "Train Epoch" in line:
                break
        else:
            pytest.fail("the run ended before training:\n" + "".join(output))
        sockets = listening_sockets(psutil.Process(launcher.pid))
        output.append(launcher.communicate(timeout=300)[0])
    finally:
        if launcher.poll() is None:
            kill_tree(launcher.pid)
    assert launcher.returncode == 0, "".join(output)
    assert any(name == "pt_elastic" for name, *_ in sockets), sockets  # the rendezvous store was seen
    return sockets


def assert_loopback_only(sockets: list[tuple[str, int, str, int]]) -> None:
    exposed = [s for s in sockets if not ipaddress.ip_address(s[2]).is_loopback]
    assert not exposed, f"listening beyond loopback: {exposed}; all: {sockets}"


@pytest.mark.processes
@pytest.mark.parametrize(
    "share_store",
    [
        pytest.param("1", id="make-train-local"),  # the workers' store hosted by rank 0
        pytest.param("0", id="shared-agent-store"),  # torch's default: the agent hosts it too
    ],
)
def test_a_local_run_listens_on_loopback_only(tmp_path: Path, tiny_root: Path, share_store: str) -> None:
    overrides = tiny_overrides(tiny_root, tmp_path / "run", "train.epochs=1", "train.log_interval=1")
    env = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=share_store, OMP_NUM_THREADS="1")
    assert_loopback_only(sockets_while_training([*LAUNCH, "-m", "job", "train", *overrides], env))


def lan_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return address.address
    return None


@pytest.mark.processes
def test_a_local_run_stays_on_loopback_when_the_host_name_resolves_to_a_lan_address(
    tmp_path: Path, tiny_root: Path
) -> None:
    """torch's defaults follow the host name: gloo listens on its address, and it becomes the
    workers' MASTER_ADDR. The launch runs in a UTS and mount namespace (root) whose host name
    resolves, through a bind-mounted /etc/hosts, to this machine's LAN address."""
    address = lan_address()
    if os.geteuid() != 0 or shutil.which("unshare") is None or address is None:
        pytest.skip("needs root, unshare and a non-loopback IPv4 address")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n::1 localhost\n{address} mnist-ddp-host\n")
    become_host = 'hostname mnist-ddp-host && mount --bind "$0" /etc/hosts && exec "$@"'
    in_namespace = ["unshare", "--uts", "--mount", "sh", "-c", become_host, str(hosts)]
    overrides = tiny_overrides(tiny_root, tmp_path / "run", "train.epochs=1", "train.log_interval=1")
    env = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    assert_loopback_only(sockets_while_training([*in_namespace, *LAUNCH, "-m", "job", "train", *overrides], env))


# --- in this process: each place torch creates a store, and the rules --------------------------


def listening_here(port: int) -> list[str]:
    return [
        c.laddr.ip for c in psutil.Process().net_connections("inet") if c.laddr.port == port and c.status == "LISTEN"
    ]


@pytest.fixture
def launcher_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    """job.launch's replacements of torch's store creation, undone after the test."""
    monkeypatch.setattr(c10d_rendezvous_backend, "TCPStore", c10d_rendezvous_backend.TCPStore)
    monkeypatch.setattr(static_tcp_rendezvous, "TCPStore", static_tcp_rendezvous.TCPStore)
    monkeypatch.setattr(
        DynamicRendezvousHandler, "_create_tcp_store_server", DynamicRendezvousHandler._create_tcp_store_server
    )
    torch_private.create_agent_stores_with(tcp_store)


def test_every_store_the_agent_hosts_for_a_loopback_host_listens_on_loopback_only(launcher_patches: None) -> None:
    c10d = RendezvousParameters(backend="c10d", endpoint="localhost:0", run_id="r", min_nodes=1, max_nodes=1)
    static = static_tcp_rendezvous.StaticTCPRendezvous("127.0.0.1", 0, rank=0, world_size=1, run_id="r", timeout=60)
    stores = {
        "c10d rendezvous (--standalone)": c10d_rendezvous_backend._create_tcp_store(c10d),
        "static rendezvous (accelerate)": static.next_rendezvous().store.underlying_store,
        "the store shared with the workers": DynamicRendezvousHandler._create_tcp_store_server(None, "127.0.0.1", 0),
    }
    for what, store in stores.items():
        assert listening_here(store.port) == ["127.0.0.1"], what


def test_a_store_for_another_host_is_left_as_torch_makes_it(launcher_patches: None) -> None:
    store = DynamicRendezvousHandler._create_tcp_store_server(None, socket.gethostname(), 0)
    assert listening_here(store.port) in (["::"], ["0.0.0.0"])


def test_a_taken_loopback_port_is_the_error_torch_raises_for_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(DistNetworkError, match="Address already in use"):
            tcp_store("localhost", taken.getsockname()[1], is_master=True)


@pytest.mark.parametrize(
    ("arguments", "local_addr"),
    [
        (["--standalone"], "127.0.0.1"),  # make train-local
        ([], "127.0.0.1"),  # one node, no rendezvous options: torchrun runs it as --standalone
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:29400"], "127.0.0.1"),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "[::1]:29400"], "::1"),
        (["--master-addr", "127.0.0.1", "--master-port", "29500"], "127.0.0.1"),  # static, as accelerate
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:29400", "--local-addr", "10.0.0.7"], "10.0.0.7"),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "node-0.example:29400"], None),
        (["--rdzv-backend", "etcd-v2", "--rdzv-endpoint", "localhost:2379"], None),  # a local etcd gateway
    ],
)
def test_a_local_rendezvous_names_this_node_by_loopback(arguments: list[str], local_addr: str | None) -> None:
    """This node's address becomes the workers' MASTER_ADDR and the shared store's host: the launcher
    passes torchrun's own --local-addr."""
    argv = launch.torchrun_arguments([*arguments, "--nproc-per-node", "2", "train.py"])
    config, _, _ = torchrun.config_from_args(torchrun.parse_args(argv))
    assert config.local_addr == local_addr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True), ("LOCALHOST.", True), ("run.localhost", True), ("127.0.0.1", True),
        ("127.1.2.3", True), ("::1", True), ("[::1]", True),
        ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("localhost.example", False), ("", False),
    ],
)  # fmt: skip
def test_only_localhost_and_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    """A host name that /etc/hosts maps to 127.0.1.1 does not count: other hosts resolve it elsewhere."""
    assert is_loopback(host) is loopback


def test_a_loopback_name_binds_the_ipv4_loopback_address() -> None:
    assert [loopback_address(h) for h in ("localhost", "127.0.0.2", "[::1]")] == ["127.0.0.1", "127.0.0.2", "::1"]


@pytest.mark.parametrize(
    ("environ", "here"),
    [
        ({}, True),  # one process, no launcher
        ({"MASTER_ADDR": "h0", "WORLD_SIZE": "1"}, True),
        ({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, True),  # by hand, on loopback
        ({"MASTER_ADDR": "h0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, True),
        ({"MASTER_ADDR": "h0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, False),
        ({"MASTER_ADDR": "h0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, False),  # by hand: not trusted
    ],
)
def test_which_jobs_have_every_rank_on_this_host(environ: dict[str, str], here: bool) -> None:
    assert all_ranks_here(environ) is here


def test_gloo_and_nccl_are_sent_to_the_loopback_interface_unless_the_user_chose() -> None:
    environ = {"NCCL_SOCKET_IFNAME": "eth1"}
    talk_over_loopback(environ)
    assert environ == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "eth1"}  # Linux: lo
    environ = {}
    talk_over_loopback(environ)
    assert environ["NCCL_SOCKET_IFNAME"] == "=lo"  # exactly lo: NCCL reads a bare name as a prefix
