"""Keeping a run whose processes all live on this host off the network: its sockets listen on
loopback only (docs/LAUNCHING.md: What listens where).

What torch does by itself (2.14.1):
- A TCPStore server listens on every interface: the libuv server binds `::`, else `0.0.0.0`
  (torch/csrc/distributed/c10d/TCPStoreLibUvBackend.cpp, `UvTcpServer::makeWithPort`), and
  TCPStore has no option for the address. It does take over a socket bound beforehand:
  `master_listen_fd` (TCPStoreOptions::masterListenFd, torch/include/.../c10d/TCPStore.hpp;
  `LibUVStoreDaemon::init` listens on it instead of binding its own).
- gloo listens on the address of the interface GLOO_SOCKET_IFNAME names, else on the address
  this host's name resolves to (`ProcessGroupGloo::createDefaultDevice`), often a LAN address.
- NCCL listens (bootstrap, proxy) on the interface NCCL_SOCKET_IFNAME names, else on the first
  that is not loopback, even in a 1-process run: measured with torch 2.11 + NCCL 2.28.9, four
  sockets on the LAN address, none with NCCL_SOCKET_IFNAME==lo (`=`: that exact name; without
  it NCCL takes the name as a prefix). Its RAS socket is on 127.0.0.1:28028 either way.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed import TCPStore


def is_loopback(host: str) -> bool:
    """Whether `host` can only mean this machine: `localhost` (and `*.localhost`, RFC 6761) or a
    loopback address. A name that merely resolves to loopback here (a hostname mapped to 127.0.1.1
    in /etc/hosts) does not count: other hosts may resolve it to this host's real address."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_address(host: str) -> str:
    """The address a loopback `host` stands for: itself if it is an address, 127.0.0.1 for a name
    (`localhost`), which clients resolving `localhost` reach whether they try ::1 first or not."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return "127.0.0.1"


def loopback_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound, not yet listening, to the loopback address `host` stands for: for a
    TCPStore server to take over (`master_listen_fd`). Port 0 picks a free one."""
    address = loopback_address(host)
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # As torch's own server socket does: a port in TIME_WAIT from an earlier run is free.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
    except OSError:
        listener.close()
        raise
    return listener


def tcp_store(host_name: str, port: int, **options: Any) -> TCPStore:
    """torch's TCPStore(host_name, port, **options), except that a server (`is_master`) for a
    loopback `host_name` listens on that loopback address only. A port already taken there raises
    DistNetworkError, the error torch's own server raises for it."""
    from torch.distributed import DistNetworkError, TCPStore

    if options.get("is_master") and options.get("master_listen_fd") is None and is_loopback(host_name):
        try:
            listener = loopback_listener(host_name, port)
        except OSError as e:
            raise DistNetworkError(f"cannot listen on {loopback_address(host_name)}:{port}: {e.strerror}") from None
        port = listener.getsockname()[1]
        options["master_listen_fd"] = listener.detach()  # the store's server closes it
    return TCPStore(host_name, port, **options)


def all_ranks_here(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether every process of the job runs on this host, as the launcher describes the job: one
    process, a loopback rendezvous address, or an elastic agent (torchrun, accelerate) that started
    all WORLD_SIZE processes here. A LOCAL_WORLD_SIZE set by hand does not count: it may be wrong."""
    if environ.get("WORLD_SIZE", "1") == "1" or is_loopback(environ.get("MASTER_ADDR", "")):
        return True
    return "TORCHELASTIC_RUN_ID" in environ and environ.get("WORLD_SIZE") == environ.get("LOCAL_WORLD_SIZE")


def talk_over_loopback(environ: MutableMapping[str, str] = os.environ) -> None:
    """Make gloo and NCCL listen on the loopback interface, unless the user chose interfaces."""
    names = {name for _, name in socket.if_nameindex()}
    interface = "lo0" if "lo0" in names and "lo" not in names else "lo"  # macOS and the BSDs: lo0
    environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    environ.setdefault("NCCL_SOCKET_IFNAME", f"={interface}")
