"""Cut a workload's network with nftables, by its cgroup v2 membership.

One table per isolated workload (``inet bam_iso_<name>``), so isolating or releasing one
workload never touches another's rules nor the host's own ruleset, and undoing is a single
``nft delete table``. The rule matches ``socket cgroupv2 level N "<path relative to
/sys/fs/cgroup>"`` on output (locally generated packets: an outbound ``connect`` fails at once
with EPERM) and on input (packets to the workload's sockets, e.g. its listener, are dropped).
The path must be relative to ``/sys/fs/cgroup`` (``unified/<name>`` on this hybrid host) —
nft resolves it to the cgroup's id when the rule is added.

A socket belongs to the cgroup its creator was in *when it was created*, so sockets of a
process adopted into the group later are not matched by the cgroup rule. The agent starts the
workloads it launches inside their group (:meth:`bam.actions.cgroup.Cgroup.enter`) from the
first instruction, and the cut also drops, by local port, every TCP/UDP socket the workload
holds when it is isolated (:func:`bam.sensors.sockets.workload_sockets`): packets *to* those
ports on input and *from* them on output. That second rule is what makes the cut hold for
adopted processes, and it does not depend on the kernel's socket-to-cgroup bookkeeping. Its
cost: another local socket bound to the same port number on a different address is cut too.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence

from bam.actions.cgroup import ActionError, Cgroup, safe_name
from bam.sensors.sockets import SocketInfo

log = logging.getLogger("bam.actions")


def nft_path() -> str:
    """The ``nft`` executable (``apt-get install nftables``), or :class:`ActionError`."""
    path = shutil.which("nft")
    if path is None:
        raise ActionError("nft (nftables) is not installed: cannot cut the network")
    return path


def _nft(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [nft_path(), *args], input=stdin, capture_output=True, text=True, timeout=10, check=False
    )
    if proc.returncode != 0:
        raise ActionError(f"nft {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


class NetworkCut:
    """An nftables table dropping every packet of one cgroup's sockets (and of the listed
    sockets' local ports)."""

    def __init__(
        self, cgroup: Cgroup, name: str | None = None, sockets: Sequence[SocketInfo] = ()
    ) -> None:
        self.cgroup = cgroup
        self.sockets = tuple(sockets)
        self.table = "bam_iso_" + safe_name(name or cgroup.path.name).replace(".", "_").replace(
            "-", "_"
        )

    def ruleset(self) -> str:
        match = f'socket cgroupv2 level {self.cgroup.level} "{self.cgroup.rel}"'
        out_rules = [f"{match} counter drop"]
        in_rules = [f"{match} counter drop"]
        for proto in ("tcp", "udp"):
            ports = sorted({s.port for s in self.sockets if s.proto == proto})
            if ports:
                pset = "{ " + ", ".join(str(p) for p in ports) + " }"
                out_rules.append(f"{proto} sport {pset} counter drop")
                in_rules.append(f"{proto} dport {pset} counter drop")
        out_body = "".join(f"    {r}\n" for r in out_rules)
        in_body = "".join(f"    {r}\n" for r in in_rules)
        return (
            f"table inet {self.table} {{\n"
            "  chain out {\n    type filter hook output priority -10; policy accept;\n"
            f"{out_body}  }}\n"
            "  chain in {\n    type filter hook input priority -10; policy accept;\n"
            f"{in_body}  }}\n"
            "}\n"
        )

    def apply(self) -> None:
        if self.active():
            return
        _nft("-f", "-", stdin=self.ruleset())
        log.warning("network cut: nft table inet %s for %s", self.table, self.cgroup.rel)

    def active(self) -> bool:
        """Read back: is the table in the kernel's ruleset now?"""
        try:
            _nft("list", "table", "inet", self.table)
        except ActionError:
            return False
        return True

    def remove(self) -> None:
        if not self.active():
            return
        _nft("delete", "table", "inet", self.table)
        log.warning("network restored: nft table inet %s deleted", self.table)
