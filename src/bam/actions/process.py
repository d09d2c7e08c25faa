"""Enforce a verifier decision on a process tree: allow, monitor, investigate, isolate, terminate.

:class:`ProcessActuator` owns one workload. It prefers a dedicated cgroup v2 group
(``bam-<name>``, the tree is *adopted* into it) because that makes every action atomic for the
whole tree and reversible: ``cgroup.freeze`` (read back from ``cgroup.events``), an nftables
table keyed on the group (:mod:`bam.actions.network`), ``cgroup.kill``. Without cgroup v2 it
falls back to signals: SIGSTOP/SIGCONT of every process of the tree (read back as state ``T``
in ``/proc/PID/stat``) and SIGKILL, and says that the network could not be cut.

Every action returns an :class:`ActionRecord` (what was asked, what was done, what was read
back, how to undo it) and is logged on ``bam.actions``; ``investigate`` adds a ``/proc``
snapshot whose sha256 digests go into the next evidence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from bam.actions.cgroup import ActionError, Cgroup, safe_name, v2_root
from bam.actions.network import NetworkCut, nft_path
from bam.sensors.sockets import workload_sockets
from bam.sensors.workload import descendants, process_exists

log = logging.getLogger("bam.actions")

ACTIONS: Final = ("allow", "monitor", "investigate", "isolate", "terminate")


@dataclass
class ActionRecord:
    """One action as applied: ``verified`` is what was read back, not what was intended."""

    action: str
    target: str
    applied: bool
    verified: bool
    ts: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)
    undo: str | None = None
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def proc_state(pid: int) -> str | None:
    """The one-letter state from ``/proc/PID/stat`` (``T`` stopped, ``Z`` zombie …)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2]


def tcp_reachable(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether a TCP connect to ``host:port`` completes within ``timeout_s``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def snapshot_processes(pids: Sequence[int], out_dir: Path) -> dict[str, Any]:
    """Copy ``status``, ``maps``, ``cmdline``, ``stat`` and the fd table of each process into
    ``out_dir``; returns per-file sha256 digests and one digest of the whole manifest.

    A text snapshot rather than a core dump: it is cheap, needs no ptrace (the workload may be
    frozen), and is what an analyst reads first (mappings, open files, sockets)."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files: dict[str, str] = {}
    for pid in sorted(pids):
        pdir = out_dir / str(pid)
        pdir.mkdir(exist_ok=True, mode=0o700)
        parts: dict[str, bytes] = {}
        for name in ("status", "maps", "cmdline", "stat", "environ"):
            with contextlib.suppress(OSError):
                parts[name] = Path(f"/proc/{pid}/{name}").read_bytes()
        fds: list[str] = []
        with contextlib.suppress(OSError):
            for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
                with contextlib.suppress(OSError):
                    fds.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
        parts["fds"] = ("\n".join(fds) + "\n").encode()
        for name, data in parts.items():
            (pdir / name).write_bytes(data)
            files[f"{pid}/{name}"] = hashlib.sha256(data).hexdigest()
    manifest = json.dumps(files, sort_keys=True).encode()
    (out_dir / "manifest.json").write_bytes(manifest)
    return {
        "dir": str(out_dir),
        "files": files,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }


class ProcessActuator:
    """Actions on one process tree (``roots`` and descendants) or one existing v2 cgroup."""

    def __init__(
        self,
        name: str,
        roots: Sequence[int] = (),
        *,
        cgroup: Cgroup | None = None,
        snapshot_dir: Path | None = None,
        use_cgroup: bool = True,
        owns_cgroup: bool = False,
    ) -> None:
        self.name = name
        self.roots = list(roots)
        self.snapshot_dir = (
            snapshot_dir or Path(tempfile.gettempdir()) / f"bam-snapshots-{safe_name(name)}"
        )
        self.cgroup = cgroup
        self._own_cgroup = owns_cgroup
        if self.cgroup is None and use_cgroup and v2_root() is not None:
            self.cgroup = Cgroup.create(name)
            self._own_cgroup = True
        self.cut: NetworkCut | None = None
        self.stopped: list[int] = []
        self.state = "allow"
        self.history: list[ActionRecord] = []

    # ---------------------------------------------------------------- helpers
    def adopt(self) -> list[int]:
        """Move the tree into our cgroup (also picks up children forked since last time)."""
        if self.cgroup is None or not self.roots:
            return []
        return self.cgroup.adopt(self.roots)

    def pids(self) -> list[int]:
        inside = set(self.cgroup.pids()) if self.cgroup is not None else set()
        return sorted(inside | descendants(self.roots))

    def _record(self, rec: ActionRecord) -> ActionRecord:
        self.history.append(rec)
        lvl = logging.WARNING if rec.action in ("isolate", "terminate", "release") else logging.INFO
        log.log(
            lvl,
            "action %s on %s: applied=%s verified=%s %s",
            rec.action,
            rec.target,
            rec.applied,
            rec.verified,
            json.dumps(rec.details, default=str)[:400],
        )
        return rec

    # ---------------------------------------------------------------- actions
    def apply(self, action: str, reasons: Sequence[str] = ()) -> ActionRecord:
        """Apply a verifier action by name (``allow``/``monitor``/``investigate``/``isolate``/
        ``terminate``); an unknown name is refused, never guessed."""
        if action not in ACTIONS:
            raise ActionError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        fn = getattr(self, action)
        rec: ActionRecord = fn()
        rec.reasons = list(reasons)
        return rec

    def allow(self) -> ActionRecord:
        """Nothing to enforce (an isolation stays until :meth:`release`: an operator ack)."""
        return self._record(ActionRecord("allow", self.name, True, True, details={}))

    def monitor(self) -> ActionRecord:
        return self._record(ActionRecord("monitor", self.name, True, True))

    def investigate(self) -> ActionRecord:
        """Keep it running; snapshot every process (digests go into the next evidence)."""
        pids = self.pids()
        out = self.snapshot_dir / time.strftime("%Y%m%dT%H%M%S") / str(len(self.history))
        snap = snapshot_processes(pids, out)
        running = [p for p in pids if proc_state(p) not in ("T", "Z", None)]
        rec = ActionRecord(
            "investigate",
            self.name,
            True,
            bool(snap["files"]) and len(running) > 0,
            details={"snapshot": snap["dir"], "manifest_sha256": snap["manifest_sha256"]},
        )
        if self.state == "allow":
            self.state = "investigate"
        return self._record(rec)

    def isolate(self) -> ActionRecord:
        """Freeze the tree and cut its network; both read back before reporting success."""
        details: dict[str, Any] = {}
        frozen = False
        net = False
        if self.cgroup is not None:
            self.adopt()
            frozen = self.cgroup.freeze()
            details["freeze"] = f"{self.cgroup.path}/cgroup.freeze"
            details["frozen_read_back"] = frozen
            try:
                nft_path()
                socks = workload_sockets(self.pids())
                self.cut = self.cut or NetworkCut(self.cgroup, self.name, socks)
                self.cut.apply()
                details["ports_cut"] = sorted({f"{s.proto}/{s.port}" for s in socks})
                net = self.cut.active()
                details["nft_table"] = f"inet {self.cut.table}"
            except ActionError as e:
                details["network_error"] = str(e)
        else:
            pids = self.pids()
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGSTOP)
            self.stopped = pids
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                states = [proc_state(p) for p in pids]
                if all(s in ("T", "t", "Z", None) for s in states):
                    frozen = True
                    break
                time.sleep(0.005)
            details["sigstop"] = pids
            details["network_error"] = "no cgroup v2: network not cut"
        details["network_cut"] = net
        details["pids"] = self.pids()
        self.state = "isolate"
        return self._record(
            ActionRecord(
                "isolate",
                self.name,
                True,
                frozen and net,
                details=details,
                undo="release",
            )
        )

    def release(self) -> ActionRecord:
        """Undo an isolation: remove the network rule, thaw (or SIGCONT) the tree."""
        details: dict[str, Any] = {}
        if self.cut is not None:
            self.cut.remove()
            details["network_restored"] = not self.cut.active()
        thawed = True
        if self.cgroup is not None and self.cgroup.exists():
            thawed = self.cgroup.thaw()
        for p in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        self.stopped = []
        details["thawed"] = thawed
        self.state = "allow"
        ok = thawed and details.get("network_restored", True)
        return self._record(ActionRecord("release", self.name, True, bool(ok), details=details))

    def terminate(self) -> ActionRecord:
        """Kill the whole tree (``cgroup.kill``, else SIGKILL to every process)."""
        if self.cgroup is not None:
            self.adopt()
            gone = self.cgroup.kill()
        else:
            pids = self.pids()
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and any(process_exists(p) for p in pids):
                time.sleep(0.005)
            gone = not any(process_exists(p) for p in pids)
        self.state = "terminate"
        return self._record(ActionRecord("terminate", self.name, True, gone))

    # ---------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Leave nothing behind: drop the nft table, thaw, and remove a cgroup we created."""
        if self.cut is not None:
            with contextlib.suppress(ActionError):
                self.cut.remove()
        for p in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        self.stopped = []
        if self.cgroup is not None and self._own_cgroup:
            with contextlib.suppress(ActionError):
                self.cgroup.remove()

    def __enter__(self) -> ProcessActuator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
