"""Which address this node's gloo and NCCL sockets use in a job that spans several hosts.

torch's default (2.14.1): gloo takes the address this host's name resolves to
(`ProcessGroupGloo::createDefaultDevice`), and tells every other rank to connect there. Where
the host name resolves to 127.0.1.1 (Debian's default /etc/hosts), does not resolve (gloo then
falls back to loopback), or resolves to an interface the other hosts cannot reach (a management
network), the other hosts connect to the wrong place: "Gloo connectFullMesh failed ... Connection
refused, remote=[127.0.1.1]". NCCL takes its first interface that is not loopback, which need
not be the one the other hosts reach either.

The address used instead: the one this host sends from to reach MASTER_ADDR, the process group's
store, which every rank must reach anyway (the kernel's choice for a UDP socket connected there;
connecting a UDP socket sends nothing). It works for every launcher: torchrun and
`python -m job.launch` (MASTER_ADDR is the --local-addr of the node holding rank 0), accelerate
and ranks started by hand, and the node's own --local-addr is not something torchrun passes to
its workers. On the node that hosts the store, MASTER_ADDR is one of its own addresses, which is
then the source too. If MASTER_ADDR is loopback here (a host name that resolves to 127.0.1.1 on
the node it names), the address of the default route is used; with neither, the node has no
address the others could reach and the job stops (exit 2) saying how to name one.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import MutableMapping
from pathlib import Path

from job.errors import LaunchError

_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's (primary) IPv4 address
_DEFAULT_ROUTE_PROBES = (
    "192.0.2.1",
    "2001:db8::1",
)  # documentation addresses (RFC 5737, 3849): only a default route leads there


_NAME_IT = (
    "give every node the address the other hosts reach it at (torchrun / python -m job.launch --local-addr "
    "ADDRESS), or name this node's interface with GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME)"
)


def route_source(host: str) -> str | None:
    """The local address this host sends from to reach `host` (a name or an address), or None
    when no route leads there."""
    try:
        candidates = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return None
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.connect(sockaddr)
            except OSError:  # ENETUNREACH: no route
                continue
            return probe.getsockname()[0].split("%", 1)[0]
    return None


def interface_holding(address: str) -> str | None:
    """The name of the interface that holds `address` (Linux), or None."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        inet6 = Path("/proc/net/if_inet6")
        lines = inet6.read_text().splitlines() if inet6.exists() else []
        for line in lines:  # "<32 hex digits> <index> <prefix> <scope> <flags> <name>"
            fields = line.split()
            if len(fields) == 6 and ipaddress.IPv6Address(int(fields[0], 16)) == ip:
                return fields[5]
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                request = struct.pack("256s", name.encode()[:15])
                held = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)[20:24])
            except OSError:  # no IPv4 address on this interface
                continue
            if held == address:
                return name
    return None


def this_node_address(master_addr: str) -> str | None:
    """The address the other hosts reach this one at (see the module's docstring), or None."""
    source = route_source(master_addr)
    if source is None or ipaddress.ip_address(source).is_loopback:
        source = next(filter(None, map(route_source, _DEFAULT_ROUTE_PROBES)), None)
    return source


def talk_over_this_nodes_address(master_addr: str, environ: MutableMapping[str, str] = os.environ) -> None:
    """Make gloo and NCCL use the interface of the address the other hosts reach this one at,
    unless the user named interfaces (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME are kept).
    LaunchError when this node has no such address."""
    if environ.get("GLOO_SOCKET_IFNAME") and environ.get("NCCL_SOCKET_IFNAME"):
        return
    address = this_node_address(master_addr)
    if address is None:
        raise LaunchError(
            f"this node's address for the other hosts would be loopback: no route leads from here to "
            f"MASTER_ADDR={master_addr} but over loopback, and no default route leaves this host; {_NAME_IT}"
        )
    interface = interface_holding(address)
    if interface is None:
        raise LaunchError(
            f"no interface of this node holds {address}, its address towards MASTER_ADDR={master_addr}; {_NAME_IT}"
        )
    environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    environ.setdefault("NCCL_SOCKET_IFNAME", f"={interface}")  # `=`: that exact name, not a prefix
