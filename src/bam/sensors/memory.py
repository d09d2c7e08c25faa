"""Memory behaviour: new executable (and writable+executable) mappings, from /proc/PID/maps.

Code injection and unpacking show up as mappings that become executable at run time,
especially anonymous or writable+executable ones. :func:`exec_mappings` lists a process's
executable mappings; :class:`MapsWatcher` reports those that appear between two looks. The
eBPF sensor adds the other half: every ``mmap``/``mprotect`` with ``PROT_EXEC`` as it
happens (``Capture.args["mmap"]``/``["mprotect"]``), which catches short-lived mappings too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def wx(self) -> bool:
        """Writable and executable at once (the classic injection signal)."""
        return "w" in self.perms and "x" in self.perms

    @property
    def anonymous(self) -> bool:
        """Not backed by a file on disk: anonymous, shared-anonymous (``/dev/zero``) or a
        memfd — code there was written at run time."""
        p = self.path
        return not p or p.startswith(("[", "/dev/zero", "/memfd:", "/SYSV"))


def exec_mappings(pid: int) -> set[Mapping]:
    """Executable mappings of ``pid`` now (empty if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    out = set()
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5 or "x" not in parts[1]:
            continue
        lo, hi = parts[0].split("-")
        out.add(Mapping(int(lo, 16), int(hi, 16), parts[1], parts[5] if len(parts) > 5 else ""))
    return out


class MapsWatcher:
    """Remembers each process's executable mappings and reports the new ones on each check."""

    def __init__(self) -> None:
        self._seen: dict[int, set[Mapping]] = {}

    def check(self, pids: set[int]) -> dict[int, list[Mapping]]:
        new: dict[int, list[Mapping]] = {}
        for pid in pids:
            now = exec_mappings(pid)
            before = self._seen.get(pid)
            if before is not None:
                added = sorted(now - before, key=lambda m: m.start)
                if added:
                    new[pid] = added
            self._seen[pid] = now
        for gone in set(self._seen) - pids:
            del self._seen[gone]
        return new
