"""Cut a workload's network with nftables, by its cgroup v2 membership.

One table per isolated workload (``inet bam_iso_<name>``), so isolating or releasing one
workload never touches another's rules nor the host's own ruleset, and undoing is a single
``nft delete table``. The rule matches ``socket cgroupv2 level N "<path relative to
/sys/fs/cgroup>"`` on output (locally generated packets: an outbound ``connect`` fails at once
with EPERM) and on input (packets to the workload's sockets, e.g. its listener, are dropped).
The path must be relative to ``/sys/fs/cgroup`` (``unified/<name>`` on this hybrid host) —
nft resolves it to the cgroup's id when the rule is added.

Limit: a socket belongs to the cgroup its creator was in *when it was created*. Sockets of a
process adopted into the group later are not matched, so the agent starts the workloads it
launches inside their group (:meth:`bam.actions.cgroup.Cgroup.enter`) from the first
instruction; for adopted running processes only new sockets are cut (the freeze still stops
all traffic they would generate).
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from bam.actions.cgroup import ActionError, Cgroup, safe_name

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
    """An nftables table dropping every packet of one cgroup's sockets."""

    def __init__(self, cgroup: Cgroup, name: str | None = None) -> None:
        self.cgroup = cgroup
        self.table = "bam_iso_" + safe_name(name or cgroup.path.name).replace(".", "_").replace(
            "-", "_"
        )

    def ruleset(self) -> str:
        match = f'socket cgroupv2 level {self.cgroup.level} "{self.cgroup.rel}"'
        return (
            f"table inet {self.table} {{\n"
            "  chain out {\n    type filter hook output priority -10; policy accept;\n"
            f"    {match} counter drop\n  }}\n"
            "  chain in {\n    type filter hook input priority -10; policy accept;\n"
            f"    {match} counter drop\n  }}\n"
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
