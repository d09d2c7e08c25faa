"""Which sockets a workload holds, from procfs alone.

Joins the ``socket:[inode]`` links of ``/proc/PID/fd`` with the socket tables of
``/proc/PID/net/{tcp,tcp6,udp,udp6}`` (the workload's own network namespace). Used by the
resource sensor (listening ports are a behavioural signal) and by the network cut (ports of
sockets created before the workload joined its cgroup, which a cgroup match cannot see).
Cheap: a few ``readlink`` calls per fd and one read per table; no scan of other processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TCP_LISTEN = "0A"


@dataclass(frozen=True)
class SocketInfo:
    """One socket of the workload: protocol (``tcp``/``udp``), local port, listening or not."""

    proto: str
    port: int
    listening: bool


def socket_inodes(pids: Iterable[int]) -> set[str]:
    """Inode numbers (as procfs prints them) of every socket the processes hold open."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    return inodes


def workload_sockets(pids: Iterable[int]) -> list[SocketInfo]:
    """TCP and UDP sockets (IPv4 and IPv6) held by the processes, with their local ports."""
    pids = sorted(set(pids))
    inodes = socket_inodes(pids)
    if not inodes:
        return []
    found: set[SocketInfo] = set()
    # Every process of a tree normally shares one netns: reading the first live one suffices.
    for pid in pids:
        read_any = False
        for table in ("tcp", "tcp6", "udp", "udp6"):
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            read_any = True
            proto = table.rstrip("6")
            for line in lines:
                f = line.split()
                if len(f) > 9 and f[9] in inodes:
                    port = int(f[1].rsplit(":", 1)[1], 16)
                    if port:
                        listening = proto == "tcp" and f[3] == _TCP_LISTEN
                        found.add(SocketInfo(proto, port, listening))
        if read_any:
            break
    return sorted(found, key=lambda s: (s.proto, s.port, s.listening))


def listening_ports(pids: Iterable[int]) -> list[int]:
    """TCP ports the processes listen on."""
    return sorted({s.port for s in workload_sockets(pids) if s.listening})


__all__ = ["SocketInfo", "listening_ports", "socket_inodes", "workload_sockets"]
