"""Policy actions on a QEMU guest, over its QMP socket.

What each verdict maps to:

* *isolate*: :func:`set_link` down on the guest's NICs (the guest keeps running, so it can
  still be inspected, but reaches nothing), or :func:`pause` (``stop``: vCPUs halt, the
  guest's state is kept exactly; QEMU's CPU time stops advancing);
* *investigate*: :func:`dump_memory` (``dump-guest-memory``, an ELF core that
  ``crash``/volatility read), best taken while paused so the image is consistent;
* *terminate*: :func:`terminate` (QMP ``quit``: QEMU exits at once; nothing inside the guest runs again);
* :func:`resume` (``cont``) undoes a pause.

Every call returns a :class:`VmActionRecord`: whether the command was applied, whether its
effect was *read back* (``query-status``, ``info network``, the QEMU process gone, an ELF
header in the dump), how to undo it, and the monitor's message when refused (it never raises
for a refused command; it raises :class:`~bam.sensors.errors.TargetGoneError` when there is
no monitor at all), so the agent can report the action as evidence.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bam.sensors.vm.qmp import Qmp, QmpError

QmpLike = Qmp | str | Path


@dataclass
class VmActionRecord:
    """One action as applied to a VM; ``verified`` is what was read back, not what was meant.

    Same fields as :class:`bam.actions.process.ActionRecord`, so the agent reports VM and
    process actions alike.
    """

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

    @property
    def ok(self) -> bool:
        return self.applied and self.verified


@contextmanager
def _session(qmp: QmpLike) -> Iterator[Qmp]:
    if isinstance(qmp, Qmp):
        yield qmp
        return
    q = Qmp(qmp)
    try:
        yield q
    finally:
        q.close()


Step = Callable[[Qmp], tuple[bool, dict[str, Any]]]


def _act(action: str, qmp: QmpLike, apply: Step, undo: str | None = None) -> VmActionRecord:
    """Apply, then read back; a refused command is an unapplied record, not an exception."""
    t0 = time.monotonic()
    with _session(qmp) as q:
        rec = VmActionRecord(action, str(q.path), applied=False, verified=False, undo=undo)
        try:
            rec.verified, rec.details = apply(q)
            rec.applied = True
        except QmpError as e:
            rec.reasons.append(str(e))
        rec.details["elapsed_s"] = round(time.monotonic() - t0, 4)
        return rec


def pause(qmp: QmpLike) -> VmActionRecord:
    """Halt the guest's vCPUs (``stop``); state is kept, :func:`resume` continues it."""

    def run(q: Qmp) -> tuple[bool, dict[str, Any]]:
        q.execute("stop")
        status = q.status()
        return status == "paused", {"status": status}

    return _act("pause", qmp, run, undo="resume")


def resume(qmp: QmpLike) -> VmActionRecord:
    """Let a paused guest run again (``cont``)."""

    def run(q: Qmp) -> tuple[bool, dict[str, Any]]:
        q.execute("cont")
        status = q.status()
        return status == "running", {"status": status}

    return _act("resume", qmp, run, undo="pause")


def terminate(qmp: QmpLike) -> VmActionRecord:
    """End QEMU now (``quit``): the guest is gone, nothing in it runs again."""

    def run(q: Qmp) -> tuple[bool, dict[str, Any]]:
        pid = q.qemu_pid()
        with contextlib.suppress(QmpError):  # QEMU may close the socket before replying
            q.execute("quit", timeout=5.0)
        gone = _wait_gone(pid, 10.0) if pid else False
        return gone, {"pid": pid, "exited": gone}

    return _act("terminate", qmp, run)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat[stat.rfind(")") + 2] in "ZX":
            return True  # exited; its parent has not reaped it yet
        time.sleep(0.02)
    return False


def nics(qmp: QmpLike) -> list[str]:
    """Names (QOM ids) of the guest's network cards, for :func:`set_link`."""
    with _session(qmp) as q:
        return [str(n["name"]) for n in q.execute("query-rx-filter")]


def set_link(qmp: QmpLike, nic: str | None = None, *, up: bool) -> VmActionRecord:
    """Set the link of one NIC (or, with ``nic=None``, every NIC) up or down."""

    def run(q: Qmp) -> tuple[bool, dict[str, Any]]:
        names = [nic] if nic else [str(n["name"]) for n in q.execute("query-rx-filter")]
        for n in names:
            q.execute("set_link", {"name": n, "up": up})
        state = link_state(q)
        back = {n: state.get(n) for n in names}
        ok = bool(names) and all(v == up for v in back.values())
        return ok, {"nics": names, "up": up, "read_back": back}

    rec = _act("link-up" if up else "link-down", qmp, run, undo="link-down" if up else "link-up")
    if rec.applied and not rec.verified and None in rec.details["read_back"].values():
        rec.reasons.append(
            "accepted by QEMU, but this QEMU shows no link state to read back (`info network`)"
        )
    return rec


def link_state(q: Qmp) -> dict[str, bool | None]:
    """NIC id -> link up (None: unknown), from ``info network`` (QMP has no query for it).

    QEMU marks a downed link in that listing only in some versions (7.2 does not), so None
    is common: the record then says the change was accepted but could not be read back.
    """
    text = str(q.execute("human-monitor-command", {"command-line": "info network"}))
    out: dict[str, bool | None] = {}
    for line in text.splitlines():
        m = re.match(r"[\s\\]*([\w.-]+): index=\d+,type=nic", line)
        if m:
            out[m.group(1)] = False if "link-down" in line or "link=off" in line else None
    return out


def dump_memory(
    qmp: QmpLike,
    path: str | Path,
    *,
    paging: bool = False,
    fmt: Literal["elf", "kdump-zlib", "kdump-lzo", "kdump-snappy", "win-dmp"] = "elf",
    timeout: float = 600.0,
) -> VmActionRecord:
    """Write the guest's memory to ``path`` (written by QEMU: it must be able to create it).

    Synchronous (``detach: false``); takes about as long as writing the guest's RAM.
    """
    target = Path(path).resolve()

    def run(q: Qmp) -> tuple[bool, dict[str, Any]]:
        args: dict[str, Any] = {"paging": paging, "protocol": f"file:{target}", "detach": False}
        if fmt != "elf":
            args["format"] = fmt
        q.execute("dump-guest-memory", args, timeout=timeout)
        try:
            with target.open("rb") as f:
                head = f.read(4)
            size = target.stat().st_size
        except OSError:
            return False, {"path": str(target)}
        ok = size > 0 and (fmt != "elf" or head == b"\x7fELF")
        return ok, {"path": str(target), "bytes": size, "format": fmt}

    return _act("dump-memory", qmp, run)


ACTIONS: dict[str, Callable[..., VmActionRecord]] = {
    "pause": pause,
    "resume": resume,
    "terminate": terminate,
    "link-down": lambda q, nic=None: set_link(q, nic, up=False),
    "link-up": lambda q, nic=None: set_link(q, nic, up=True),
    "dump-memory": dump_memory,
}
