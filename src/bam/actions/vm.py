"""Policy actions on a QEMU guest, over its QMP socket.

What each verdict maps to:

* *isolate*: :func:`set_link` down on the guest's NICs (the guest keeps running, so it can
  still be inspected, but reaches nothing), or :func:`pause` (``stop``: vCPUs halt, the
  guest's state is kept exactly; QEMU's CPU time stops advancing);
* *investigate*: :func:`dump_memory` (``dump-guest-memory``, an ELF core that
  ``crash``/volatility read), best taken while paused so the image is consistent;
* *terminate*: :func:`terminate` (QMP ``quit``: QEMU exits at once; nothing inside the guest runs again);
* :func:`resume` (``cont``) undoes a pause.

:class:`VmActuator` is the agent's executor for a VM target: *isolate* = pause + every link
down (both read back), *release* undoes both.

Every call returns a :class:`VmActionRecord`: whether the command was applied, whether its
effect was *read back* (``query-status``, the NIC's link bit, the QEMU process gone, an ELF
header in the dump), how to undo it, and the monitor's message when refused (it never raises
for a refused command; it raises :class:`~bam.sensors.errors.TargetGoneError` when there is
no monitor at all), so the agent can report the action as evidence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from bam.actions.cgroup import ActionError
from bam.sensors.errors import TargetGoneError
from bam.sensors.vm.qmp import Qmp, QmpError

log = logging.getLogger("bam.actions")

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
    """NIC id -> link up (None: unknown).

    ``info network`` marks a downed link only in some QEMU versions (7.2 does not); where it
    says nothing, a virtio-net NIC's link is read from the device itself
    (:func:`virtio_net_link`). None only when neither can tell.
    """
    text = str(q.execute("human-monitor-command", {"command-line": "info network"}))
    out: dict[str, bool | None] = {}
    for line in text.splitlines():
        m = re.match(r"[\s\\]*([\w.-]+): index=\d+,type=nic", line)
        if m:
            out[m.group(1)] = False if "link-down" in line or "link=off" in line else None
    unknown = [n for n, v in out.items() if v is None]
    if unknown:
        macs: dict[str, str] = {}
        with contextlib.suppress(QmpError):
            macs = {
                str(n["name"]): str(n.get("main-mac", "")) for n in q.execute("query-rx-filter")
            }
        for n in unknown:
            with contextlib.suppress(QmpError):
                out[n] = virtio_net_link(q, n, macs.get(n))
    return out


VIRTIO_PCI_DEVICE_CFG: Final = 0x2000
"""Where QEMU's modern virtio-pci places the device-specific config inside BAR 4."""


def _pci_devices(devs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in devs:
        yield d
        bridge = d.get("pci_bridge") or {}
        yield from _pci_devices(list(bridge.get("devices") or []))


def virtio_net_link(q: Qmp, nic: str, mac: str | None = None) -> bool | None:
    """The ``VIRTIO_NET_S_LINK_UP`` bit of a virtio-net NIC, as its driver would read it.

    The device config (``mac[6]``, ``status`` u16) is read over the monitor (``xp``) from the
    NIC's memory BAR 4, where QEMU's modern virtio-pci transport maps it at offset 0x2000
    (BAR address from ``query-pci``). The MAC read there must equal the NIC's (``mac``, from
    ``query-rx-filter``), proving the right register was read; otherwise None.
    """
    bar: int | None = None
    for bus in q.execute("query-pci"):
        for dev in _pci_devices(list(bus.get("devices") or [])):
            if dev.get("qdev_id") != nic:
                continue
            for r in dev.get("regions") or []:
                if r.get("bar") == 4 and r.get("type") == "memory":
                    bar = int(r["address"])
    if bar is None or bar == 0 or bar >= (1 << 63):
        return None
    addr = bar + VIRTIO_PCI_DEVICE_CFG
    text = str(q.execute("human-monitor-command", {"command-line": f"xp /8bx {addr:#x}"}))
    values = re.findall(r"0x([0-9a-fA-F]{2})\b", text.partition(":")[2])
    if len(values) < 8:
        return None
    cfg = bytes(int(v, 16) for v in values[:8])
    if mac and cfg[:6].hex(":") != mac.lower():
        return None
    return bool(int.from_bytes(cfg[6:8], "little") & 1)


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


VERDICTS: Final = ("allow", "monitor", "investigate", "isolate", "terminate")


class VmActuator:
    """Enforce a verifier decision on one QEMU VM over its QMP socket (the agent's executor).

    * allow / monitor: nothing (an isolation is undone only by :meth:`release`);
    * investigate: the guest's memory as an ELF core (``dump-guest-memory``; QEMU halts the
      vCPUs for the dump and resumes them), its sha256 goes into the next evidence;
    * isolate: :func:`pause` (vCPUs halt at once: the attacker's processes stop) then
      :func:`set_link` down on every NIC; verified only if ``query-status`` says paused *and*
      every NIC's link reads back down;
    * terminate: QMP ``quit``, verified by the QEMU process being gone.

    :meth:`close` leaves the VM as it is: the agent does not own a VM it attached to by its
    socket, and an agent restart must not release a guest it isolated.
    """

    def __init__(self, name: str, qmp: Qmp, *, snapshot_dir: Path | None = None) -> None:
        self.name = name
        self.qmp = qmp
        self.snapshot_dir = snapshot_dir
        self.state = "allow"
        self.history: list[VmActionRecord] = []

    def _record(self, rec: VmActionRecord) -> VmActionRecord:
        self.history.append(rec)
        log.log(
            logging.WARNING if rec.action in ("isolate", "terminate", "release") else logging.INFO,
            "action %s on vm %s: applied=%s verified=%s %s",
            rec.action,
            self.name,
            rec.applied,
            rec.verified,
            rec.details,
        )
        return rec

    def apply(self, action: str, reasons: Sequence[str] = ()) -> VmActionRecord:
        """Apply a verifier action by name; an unknown name is refused, never guessed."""
        if action not in VERDICTS:
            raise ActionError(f"unknown action {action!r}; expected one of {', '.join(VERDICTS)}")
        try:
            rec: VmActionRecord = getattr(self, action)()
        except (QmpError, TargetGoneError) as e:
            raise ActionError(f"vm {self.name}: {action} failed: {e}") from None
        rec.reasons = [*rec.reasons, *reasons]
        return rec

    def allow(self) -> VmActionRecord:
        return self._record(VmActionRecord("allow", self.name, True, True))

    def monitor(self) -> VmActionRecord:
        return self._record(VmActionRecord("monitor", self.name, True, True))

    def investigate(self) -> VmActionRecord:
        base = self.snapshot_dir or Path(tempfile.gettempdir()) / f"bam-vm-{self.name}"
        out = base / time.strftime("%Y%m%dT%H%M%S") / str(len(self.history))
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        dump = dump_memory(self.qmp, out / "memory.elf")
        details = dict(dump.details)
        if dump.verified:
            h = hashlib.sha256()
            with (out / "memory.elf").open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            details["memory_sha256"] = h.hexdigest()
            manifest = json.dumps({"memory.elf": details["memory_sha256"]}, sort_keys=True)
            (out / "manifest.json").write_text(manifest)
            details["manifest_sha256"] = hashlib.sha256(manifest.encode()).hexdigest()
        details["status"] = self.qmp.status()
        if self.state == "allow":
            self.state = "investigate"
        rec = VmActionRecord("investigate", self.name, dump.applied, dump.verified, details=details)
        rec.reasons = dump.reasons
        return self._record(rec)

    def isolate(self) -> VmActionRecord:
        p = pause(self.qmp)
        link = set_link(self.qmp, up=False)
        status = self.qmp.status()
        back = link.details.get("read_back", {})
        details = {
            "status": status,
            "nics": link.details.get("nics", []),
            "link_read_back": back,
            "pause_s": p.details.get("elapsed_s"),
            "link_s": link.details.get("elapsed_s"),
        }
        ok = status == "paused" and bool(back) and all(v is False for v in back.values())
        self.state = "isolate"
        rec = VmActionRecord(
            "isolate", self.name, p.applied and link.applied, ok, details=details, undo="release"
        )
        rec.reasons = p.reasons + link.reasons
        return self._record(rec)

    def release(self) -> VmActionRecord:
        link = set_link(self.qmp, up=True)
        r = resume(self.qmp)
        back = link.details.get("read_back", {})
        status = self.qmp.status()
        ok = status == "running" and bool(back) and all(v is not False for v in back.values())
        self.state = "allow"
        rec = VmActionRecord(
            "release",
            self.name,
            r.applied and link.applied,
            ok,
            details={"status": status, "link_read_back": back},
        )
        rec.reasons = r.reasons + link.reasons
        return self._record(rec)

    def terminate(self) -> VmActionRecord:
        t = terminate(self.qmp)
        self.state = "terminate"
        rec = VmActionRecord("terminate", self.name, t.applied, t.verified, details=t.details)
        rec.reasons = t.reasons
        return self._record(rec)

    def close(self) -> None:
        """Nothing to undo (see the class docstring); the caller closes the QMP session."""
