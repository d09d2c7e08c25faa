"""Start the BAM guest under QEMU with QMP on a unix socket, and describe it for the sensors.

Everything about one VM lives in its *run directory*: ``qmp.sock`` (the monitor an agent
holds), ``qmp-ops.sock`` (a second monitor: QEMU serves one client per monitor socket, so
tools, operators and checks use this one while an agent is attached),
``trace.bin`` (the guest's syscall stream, written by QEMU's file chardev), ``console.log``
(the guest's ``ttyS0``), ``disk.img`` (a scratch virtio-blk disk, so block statistics have
something to count) and ``vm.json`` (pid, paths, and the guest/host clock anchor). ``bam
record --vm RUN/qmp.sock`` finds the rest from ``vm.json`` beside the socket.

Why a file and not a socket for the stream: a QEMU socket chardev drops what the guest writes
while no reader is connected, and the page stream cannot be re-framed mid-way; a file keeps
everything from boot, and a sensor attaching later starts at the next page boundary.

Acceleration: real KVM where it works (``vmx``/``svm`` in ``/proc/cpuinfo``, ``/dev/kvm``
usable, and not the nested ``kvm_pvm`` module, which cannot run ordinary guests); otherwise
TCG (software emulation, ~7x slower guest compute, boots in 3-6 s).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal

from bam.sensors.errors import SensorError, SensorUnavailableError
from bam.sensors.vm.image import TRACE_PORT, GuestImage, build_image

QEMU: Final = "qemu-system-x86_64"
Transport = Literal["virtio", "serial"]
HEADER_END: Final = b"PAGES 4096\n"


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise SensorUnavailableError(
            f"{QEMU} not found: `apt-get install --no-install-recommends qemu-system-x86`"
        )
    return path


def kvm_usable() -> bool:
    """Whether real hardware virtualisation can run a guest here (else TCG is used)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if " vmx" not in flags and " svm" not in flags:
        return False
    if Path("/sys/module/kvm_pvm").exists():
        return False
    try:
        if "kvm_pvm" in Path("/proc/modules").read_text():
            return False
    except OSError:
        pass
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


@dataclass
class VmSpec:
    """What to boot. ``workload`` is a shell script run by the guest's busybox ``sh``."""

    name: str = "bam-guest"
    memory_mb: int = 256
    workload: str | None = None
    repeat: int = 1
    pause_s: float = 0.5
    trace: bool = True
    transport: Transport = "virtio"
    disk_mb: int = 8
    net: bool = True
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    extra_append: str = ""
    forwards: tuple[tuple[int, int], ...] = ()
    """``(host port, guest port)`` TCP forwards of the user-mode network (``hostfwd``); the
    host side listens on 127.0.0.1 only. The guest reaches the host's loopback as 10.0.2.2."""

    def append(self) -> str:
        parts = ["console=ttyS0", "quiet", "panic=-1", f"bam_repeat={self.repeat}"]
        parts.append(f"bam_pause={self.pause_s:g}")
        if not self.trace:
            parts.append("bam_trace=0")
        if self.workload is not None:
            parts.append("bam_run=" + base64.b64encode(self.workload.encode()).decode())
        if self.extra_append:
            parts.append(self.extra_append)
        line = " ".join(parts)
        if len(line) > 2000:
            raise SensorError(
                f"guest workload too long for the kernel command line ({len(line)} > 2000 bytes)"
            )
        return line


@dataclass
class VmInfo:
    """What ``vm.json`` says about a running VM (enough for a sensor attaching later)."""

    run_dir: Path
    pid: int
    qmp: Path
    trace: Path
    console: Path
    accel: str
    transport: str
    kernel_package: str
    started: float
    header_len: int = 0
    sync_uptime: float | None = None
    sync_epoch: float | None = None
    boot_s: float | None = None
    qmp_ops: Path | None = None
    """A second QMP socket, free while an agent holds ``qmp`` (None: the VM has only one)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        tmp = self.run_dir / ".vm.json.tmp"
        tmp.write_text(json.dumps(d, indent=2))
        os.replace(tmp, self.run_dir / "vm.json")

    @classmethod
    def load(cls, where: str | Path) -> VmInfo:
        """From a run directory, its ``vm.json``, or the QMP socket inside it."""
        p = Path(where)
        f = p if p.name == "vm.json" else (p / "vm.json" if p.is_dir() else p.parent / "vm.json")
        try:
            d = json.loads(f.read_text())
        except OSError:
            raise SensorError(
                f"{where}: no vm.json beside it; start the guest with `bam vm start`"
            ) from None
        except ValueError as e:
            raise SensorError(f"{f}: not valid JSON: {e}") from None
        known = {f.name for f in fields(cls)}
        try:
            for k in ("run_dir", "qmp", "trace", "console"):
                d[k] = Path(d[k])
            if d.get("qmp_ops"):
                d["qmp_ops"] = Path(d["qmp_ops"])
            return cls(**{k: v for k, v in d.items() if k in known})
        except (KeyError, TypeError) as e:
            raise SensorError(f"{f}: not a BAM vm.json ({e})") from None


class Vm:
    """A launched QEMU guest. Use as a context manager: leaving it always ends QEMU."""

    def __init__(self, info: VmInfo, proc: subprocess.Popen[bytes] | None, own_dir: bool) -> None:
        self.info = info
        self.proc = proc
        self._own_dir = own_dir

    @property
    def pid(self) -> int:
        return self.info.pid

    @property
    def qmp_path(self) -> Path:
        return self.info.qmp

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.info.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until the guest's trace header has arrived; returns seconds since launch.

        The moment the header appears is this host's best view of the guest clock: its
        ``SYNC`` line (guest uptime) paired with our clock gives the offset that dates the
        guest's events in epoch seconds (error ~10-20 ms: uptime's resolution + polling).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                head = self.info.trace.read_bytes()[:8192]
            except OSError:
                head = b""
            if HEADER_END in head:
                now = time.time()
                hdr = head[: head.index(HEADER_END) + len(HEADER_END)]
                for line in hdr.decode(errors="replace").splitlines():
                    if line.startswith("SYNC "):
                        self.info.sync_uptime = float(line.split()[1])
                self.info.sync_epoch = now
                self.info.header_len = len(hdr)
                self.info.boot_s = now - self.info.started
                self.info.save()
                return self.info.boot_s
            if not self.alive():
                raise SensorError(f"QEMU exited during boot; console: {_tail(self.info.console)}")
            time.sleep(0.01)
        raise SensorError(
            f"guest not ready after {timeout:.0f} s; console: {_tail(self.info.console)}"
        )

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit (e.g. the guest powered off); its exit status or None."""
        if self.proc is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.alive():
                if deadline is not None and time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
            return 0
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """End QEMU for sure: QMP ``quit``, then SIGTERM, then SIGKILL; reap it."""
        if self.alive():
            with contextlib.suppress(Exception):
                from bam.sensors.vm.qmp import Qmp

                ops = self.info.qmp_ops
                sock = ops if ops is not None and ops.exists() else self.info.qmp
                with Qmp(sock, timeout=2.0) as q:
                    q.execute("quit")
            if self.wait(2.0) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.info.pid, signal.SIGTERM)
                if self.wait(2.0) is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.info.pid, signal.SIGKILL)
                    self.wait(5.0)
        elif self.proc is not None:
            self.proc.poll()

    def cleanup(self) -> None:
        """Kill QEMU and remove the run directory if this launcher created it."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.info.run_dir, ignore_errors=True)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _tail(p: Path, n: int = 400) -> str:
    try:
        return p.read_text(errors="replace")[-n:].strip() or "(empty)"
    except OSError:
        return "(none)"


def qemu_argv(spec: VmSpec, image: GuestImage, run: Path, accel: str) -> list[str]:
    """The QEMU command line (boot flags measured to boot fastest here)."""
    argv = [
        qemu_binary(),
        "-name", spec.name,
        "-accel", accel,
        "-m", str(spec.memory_mb),
        "-smp", "1",  # the guest streams cpu0's ring buffer only
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", spec.append(),
        "-serial", f"file:{run / 'console.log'}",
        "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
        "-qmp", f"unix:{run / 'qmp-ops.sock'},server=on,wait=off",
        "-pidfile", str(run / "qemu.pid"),
        "-chardev", f"file,id=bamtrace,path={run / 'trace.bin'}",
    ]  # fmt: skip
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if spec.transport == "virtio":
        argv += ["-device", "virtio-serial-pci", "-device",
                 f"virtserialport,chardev=bamtrace,name={TRACE_PORT}"]  # fmt: skip
    else:
        argv += ["-serial", "chardev:bamtrace"]
    if spec.disk_mb > 0:
        disk = run / "disk.img"
        with disk.open("wb") as f:
            f.truncate(spec.disk_mb << 20)
        argv += ["-drive", f"file={disk},format=raw,if=virtio,id=disk0"]
    if spec.net:
        netdev = "user,id=net0" + "".join(
            f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in spec.forwards
        )
        argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,id=nic0"]
    elif spec.forwards:
        raise SensorError("port forwards need the guest network (net=True)")
    return argv


def launch(
    spec: VmSpec | None = None,
    *,
    image: GuestImage | None = None,
    run_dir: Path | None = None,
    ready_timeout: float | None = 60.0,
) -> Vm:
    """Boot the guest; returns once its trace stream has started (``ready_timeout=None``:
    at once). QEMU runs in its own session, so it outlives a CLI that started it detached."""
    spec = spec or VmSpec()
    image = image or build_image()
    accel = spec.accel if spec.accel != "auto" else ("kvm" if kvm_usable() else "tcg")
    if accel == "kvm" and not kvm_usable():
        raise SensorUnavailableError("KVM cannot run guests on this host; use --accel tcg")
    own = run_dir is None
    run = Path(tempfile.mkdtemp(prefix=f"bam-vm-{spec.name}-")) if run_dir is None else run_dir
    run.mkdir(parents=True, exist_ok=True)
    for stale in ("qmp.sock", "qmp-ops.sock", "trace.bin", "console.log", "vm.json", "qemu.pid"):
        with contextlib.suppress(FileNotFoundError):
            (run / stale).unlink()
    argv = qemu_argv(spec, image, run, accel)
    log = (run / "qemu.log").open("wb")
    started = time.time()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    finally:
        log.close()
    info = VmInfo(
        run_dir=run,
        pid=proc.pid,
        qmp=run / "qmp.sock",
        qmp_ops=run / "qmp-ops.sock",
        trace=run / "trace.bin",
        console=run / "console.log",
        accel=accel,
        transport=spec.transport if spec.trace else "none",
        kernel_package=image.kernel_package,
        started=started,
        extra={"memory_mb": spec.memory_mb, "argv": argv},
    )
    info.save()
    vm = Vm(info, proc, own)
    try:
        deadline = time.monotonic() + 10
        while not info.qmp.exists():
            if proc.poll() is not None:
                raise SensorError(f"QEMU failed to start: {_tail(run / 'qemu.log')}")
            if time.monotonic() > deadline:
                raise SensorError(f"QEMU made no QMP socket: {_tail(run / 'qemu.log')}")
            time.sleep(0.01)
        if ready_timeout is not None and spec.trace:
            vm.wait_ready(ready_timeout)
    except BaseException:
        vm.cleanup() if own else vm.kill()
        raise
    return vm
