"""Who is on the other end of a monitor connection: the local user whose socket it is.

A reset changes state, which only root and the daemon's admin group may do; the monitor runs
as root, so it must not lend its own credentials to whoever reaches its address. A TCP
connection from this machine has a socket on this machine, and the kernel lists every socket
with its owner's uid in ``/proc/net/tcp`` and ``/proc/net/tcp6`` (the uid of the process that
created it, which its owner cannot change). The client's socket is the one whose local end is
the connection's peer address and whose remote end is the monitor's own. A connection from
another machine has no such socket: its user is unknown here.
"""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_ESTABLISHED = "01"

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def socket_owner(peer: tuple, ours: tuple, tables: tuple[Path, ...] = TABLES) -> int | None:
    """The uid owning the socket at ``peer`` that is connected to ``ours`` (both as
    ``getpeername``/``getsockname`` give them); None when no socket of this machine is."""
    want = (_address(peer), _address(ours))
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:  # no IPv6 in this kernel
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != _ESTABLISHED:
                continue
            try:
                entry = (_parse(fields[1]), _parse(fields[2]))
            except ValueError:
                continue
            if entry == want:
                return int(fields[7])
    return None


def _address(sockaddr: tuple) -> Address:
    """An address as the tables compare it: an IPv4 address seen through an IPv6 socket
    (``::ffff:127.0.0.1``) is the IPv4 address its own socket has."""
    ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(sockaddr[1])


def _parse(field: str) -> Address:
    """``0100007F:1F90``: the address as the kernel's 32-bit words in this machine's byte
    order, then the port."""
    hexaddr, _, hexport = field.partition(":")
    words = [int(hexaddr[i : i + 8], 16) for i in range(0, len(hexaddr), 8)]
    if len(words) not in (1, 4):
        raise ValueError(f"not an address: {field!r}")
    packed = struct.pack(f"={len(words)}I", *words)
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(hexport, 16)
