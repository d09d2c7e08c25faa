"""Build the small guest BAM boots to watch a VM from the outside: a kernel and an initramfs.

Why this guest: the point is a system-call stream from *inside* a VM without any agent in it.
The guest kernel's own tracefs does the capture; a busybox ``/init`` enables
``raw_syscalls:sys_enter``, copies ``per_cpu/cpu0/trace_pipe_raw`` (binary ring-buffer pages,
4096 bytes each, not the text pipe) to a virtio-serial port (or the second UART, ``ttyS1``)
that QEMU writes to a host file, then runs the workload. The host decodes the pages with the
same numpy decoder as the host tracefs sensor (:func:`bam.sensors.tracefs.decode_pages`).

Where the parts come from, so a fresh Debian host can build it with its ordinary tools:

* kernel: Debian's **cloud** kernel (boots to ``/init`` in 3-6 s under TCG; the generic one
  takes 8-15 s). ``apt-cache depends linux-image-cloud-amd64`` names the current ABI package,
  ``apt-get download`` fetches it and the ``.deb`` is unpacked in Python (``ar`` + ``tar``,
  so ``dpkg`` is not even needed). ``BAM_VM_KERNEL`` / ``kernel=`` use a given bzImage.
* modules: the few the guest needs (virtio PCI, virtio-blk, virtio-net, virtio-console) are
  copied from that package into the initramfs with their ``depends=`` closure, in load order.
* userland: ``busybox-static`` (one static binary; applets are linked at boot).
* initramfs: a ``newc`` cpio written in Python (no ``cpio`` binary needed, reproducible).

Everything lands in ``~/.cache/bam/vm/<kernel>-<hash>/`` (``$XDG_CACHE_HOME`` honoured) and
is reused while the kernel package, busybox and the init script are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bam.sensors.errors import SensorUnavailableError

META_PACKAGE: Final = "linux-image-cloud-amd64"
TRACE_PORT: Final = "org.bam.trace"
"""Name of the virtio-serial port the guest streams its trace to."""

MODULES: Final = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console")
"""Guest drivers loaded by ``/init`` (the cloud kernel builds them as modules)."""

BUSYBOX_CANDIDATES: Final = ("/bin/busybox", "/usr/bin/busybox")

DEFAULT_WORKLOAD: Final = """\
# BAM demo workload: ordinary busybox activity (files, processes, a block device).
echo "bam workload round $BAM_ROUND"
ls -l / /proc/self/ > /dev/null
cat /proc/cpuinfo /proc/meminfo > /dev/null
echo "round $BAM_ROUND" > /tmp/bam.log
grep -c processor /proc/cpuinfo > /dev/null
date > /dev/null
uname -a > /dev/null
ps > /dev/null
if [ -b /dev/vda ]; then dd if=/dev/zero of=/dev/vda bs=4096 count=32 conv=fsync 2>/dev/null; fi
if [ -b /dev/vda ]; then dd if=/dev/vda of=/dev/null bs=4096 count=32 2>/dev/null; fi
"""

# The guest's /init. Kernel command line (read from /proc/cmdline):
#   bam_run=<base64 script>   workload (default: /bam/workload.sh)
#   bam_repeat=<n>            run it n times, 0 = forever (default 1)
#   bam_pause=<s>             sleep between rounds (default 0.5)
#   bam_trace=0               do not enable tracing
#   bam_flush=<s>             how often the guest ships trace pages (default 0.25)
# Stream on the trace port: text header lines, then 4096-byte ring-buffer pages, then a
# trailer "page" starting with BAMEND (per-CPU stats), after which the guest powers off.
INIT_SCRIPT: Final = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
# virtio drivers only if QEMU gave us virtio devices (vendor 0x1af4): each insmod checks a
# module signature, which costs ~0.3 s under TCG
if cat /sys/bus/pci/devices/*/vendor 2>/dev/null | grep -q 0x1af4; then
  for m in $(cat /lib/modules/load.order); do insmod /lib/modules/$m.ko 2>/dev/null; done
fi
RUN=; REPEAT=1; PAUSE=0.5; TRACE=1; FLUSH=0.25
for w in $(cat /proc/cmdline); do
  case $w in
    bam_run=*) RUN=${w#bam_run=};;
    bam_repeat=*) REPEAT=${w#bam_repeat=};;
    bam_pause=*) PAUSE=${w#bam_pause=};;
    bam_trace=*) TRACE=${w#bam_trace=};;
    bam_flush=*) FLUSH=${w#bam_flush=};;
  esac
done
if [ -n "$RUN" ]; then echo "$RUN" | base64 -d > /tmp/workload.sh; else cp /bam/workload.sh /tmp/workload.sh; fi
ip link set lo up 2>/dev/null
ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 2>/dev/null
OUT=/dev/ttyS1
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name 2>/dev/null)" = "@PORT@" ] && OUT=/dev/${p##*/}
done
[ "$OUT" = /dev/ttyS1 ] && stty -F /dev/ttyS1 raw -echo 2>/dev/null
T=/sys/kernel/tracing
CAT=
# Copy whole ring-buffer pages every FLUSH s, only as many as hold the unread events: a
# reader blocked in read() would wake for every event and ship a near-empty 4 KiB page each
# time. ceil(entries/60) reads never block (each page holds <= 60 events). Its pid and its
# children (event-fork) are not traced. It drains the buffer and exits after /tmp/bam.stop.
reader() {
  read -r _ < /tmp/bam.go  # wait until our pid is excluded from tracing (no fork here)
  while :; do
    e=$(sed -n 's/^entries: *//p' $T/per_cpu/cpu0/stats)
    if [ "${e:-0}" -gt 0 ]; then
      dd if=$T/per_cpu/cpu0/trace_pipe_raw bs=4096 count=$(( (e + 59) / 60 )) 2>/dev/null
    elif [ -e /tmp/bam.stop ]; then
      break
    fi
    sleep $FLUSH
  done
}
if [ "$TRACE" != 0 ] && [ -d $T/events/raw_syscalls/sys_enter ]; then
  echo 0 > $T/tracing_on
  echo mono > $T/trace_clock
  echo 0 > $T/options/overwrite
  echo 8192 > $T/buffer_size_kb
  F=$T/events/raw_syscalls/sys_enter/format
  {
    echo "BAMVM 1"
    echo "FORMAT $(wc -c < $F)"; cat $F
    echo "SYNC $(cut -d' ' -f1 /proc/uptime)"
    echo "PAGES 4096"
  } > $OUT
  echo 1 > $T/options/event-fork
  mkfifo /tmp/bam.go
  reader > $OUT &
  CAT=$!
  echo $CAT > $T/set_event_notrace_pid
  echo go > /tmp/bam.go
  echo 1 > $T/events/raw_syscalls/sys_enter/enable
  echo 1 > $T/tracing_on
fi
echo "bam-guest: workload start (trace -> $OUT)"
i=0
while [ "$REPEAT" = 0 ] || [ $i -lt $REPEAT ]; do
  i=$((i+1)); BAM_ROUND=$i sh /tmp/workload.sh
  [ "$REPEAT" = 0 ] || [ $i -lt $REPEAT ] && sleep $PAUSE
done
echo "bam-guest: workload done"
if [ -n "$CAT" ]; then
  echo 0 > $T/events/raw_syscalls/sys_enter/enable
  echo 0 > $T/tracing_on
  touch /tmp/bam.stop
  wait $CAT
  { printf 'BAMEND\0\0'; cat $T/per_cpu/cpu0/stats; } > /tmp/trailer
  dd if=/tmp/trailer of=$OUT bs=4096 count=1 conv=sync 2>/dev/null
  sleep 1
fi
echo "bam-guest: power off"
poweroff -f
"""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel, initramfs, and what they were built from."""

    kernel: Path
    initrd: Path
    kernel_package: str
    directory: Path

    def manifest(self) -> dict[str, str]:
        return {
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "kernel_package": self.kernel_package,
            "directory": str(self.directory),
        }


def cache_root() -> Path:
    """``~/.cache/bam/vm`` (``$XDG_CACHE_HOME`` honoured, ``$BAM_VM_CACHE`` overrides)."""
    if os.environ.get("BAM_VM_CACHE"):
        return Path(os.environ["BAM_VM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bam" / "vm"


def busybox_path() -> Path:
    """The static busybox to put in the guest (it must be static: the guest has no libc)."""
    for c in BUSYBOX_CANDIDATES:
        p = Path(c)
        if p.is_file() and b"\x00/lib64/ld-linux" not in p.read_bytes()[:4096]:
            return p
    raise SensorUnavailableError(
        "no static busybox for the guest: install it with "
        "`apt-get install --no-install-recommends busybox-static`"
    )


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SensorUnavailableError(
            f"{argv[0]} not found: building the guest needs Debian's apt tools"
        ) from None
    if done.returncode != 0:
        raise SensorUnavailableError(
            f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()[-400:]}"
        )
    return done.stdout


def kernel_package() -> str:
    """The current cloud kernel's package name, from ``apt-cache depends`` (never hard-coded).

    An empty apt cache (fresh machine, no ``apt-get update`` yet) is refreshed once when root.
    """
    try:
        out = _run(["apt-cache", "depends", META_PACKAGE])
    except SensorUnavailableError:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise
        _run(["apt-get", "update", "-qq"])
        out = _run(["apt-cache", "depends", META_PACKAGE])
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Depends" and value.strip().startswith("linux-image-"):
            return value.strip()
    raise SensorUnavailableError(f"apt-cache depends {META_PACKAGE} names no kernel package")


def _deb_members(deb: Path) -> dict[str, bytes]:
    """Members of a ``.deb`` (an ``ar`` archive) by name."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise SensorUnavailableError(f"{deb} is not a Debian package")
    out: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(data):
        hdr = data[pos : pos + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def extract_kernel(deb: Path, dest: Path, modules: tuple[str, ...] = MODULES) -> list[Path]:
    """Unpack ``boot/vmlinuz-*`` and the wanted modules (+ dependencies, load order first).

    Returns the module files in load order; the kernel is written to ``dest/vmlinuz``.
    """
    members = _deb_members(deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise SensorUnavailableError(f"{deb} has no data.tar member")
    if name.endswith(".zst"):
        raise SensorUnavailableError(f"{deb}: zstd-compressed packages are not supported")
    kos: dict[str, bytes] = {}
    kernel: bytes | None = None
    with tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*") as tar:
        for m in tar:
            base = m.name.rsplit("/", 1)[-1]
            if m.isfile() and "/boot/vmlinuz-" in "/" + m.name.lstrip("./"):
                f = tar.extractfile(m)
                kernel = f.read() if f else None
            elif m.isfile() and base.endswith(".ko"):
                f = tar.extractfile(m)
                if f is not None:
                    kos[base[:-3].replace("-", "_")] = f.read()
    if kernel is None:
        raise SensorUnavailableError(f"{deb} holds no boot/vmlinuz-*")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vmlinuz").write_bytes(kernel)
    order: list[str] = []

    def visit(mod: str, path: tuple[str, ...]) -> None:
        if mod in order or mod in path:
            return
        if mod not in kos:
            return  # built in (or absent: /init tolerates a failed insmod)
        for dep in _depends(kos[mod]):
            visit(dep, (*path, mod))
        order.append(mod)

    for wanted in modules:
        visit(wanted, ())
    mod_dir = dest / "modules"
    mod_dir.mkdir(exist_ok=True)
    out = []
    for mod in order:
        p = mod_dir / f"{mod}.ko"
        p.write_bytes(kos[mod])
        out.append(p)
    return out


def _depends(ko: bytes) -> list[str]:
    """The ``depends=`` list of a module's ``.modinfo`` (what ``modinfo -F depends`` prints)."""
    i = ko.find(b"\0depends=")
    if i < 0:
        return []
    end = ko.index(b"\0", i + 1)
    deps = ko[i + 9 : end].decode()
    return [d.replace("-", "_") for d in deps.split(",") if d]


class Cpio:
    """A ``newc`` cpio archive built in memory (what the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        nb = name.encode() + b"\0"
        hdr = (
            "070701"
            + "".join(
                f"{v:08x}" for v in (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
            )
        ).encode()
        self._ino += 1
        self._buf.write(hdr + nb)
        self._buf.write(b"\0" * (-(len(hdr) + len(nb)) % 4))
        self._buf.write(data)
        self._buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def node(self, name: str, major: int, minor: int) -> None:
        nb = name.encode() + b"\0"
        fields = (self._ino, 0o020600, 0, 0, 1, 0, 0, 0, 0, major, minor, len(nb), 0)
        hdr = ("070701" + "".join(f"{v:08x}" for v in fields)).encode()
        self._ino += 1
        self._buf.write(hdr + nb + b"\0" * (-(len(hdr) + len(nb)) % 4))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def initramfs(busybox: Path, modules: list[Path], workload: str = DEFAULT_WORKLOAD) -> bytes:
    """The guest initramfs: busybox, ``/init``, the modules in load order, a default workload."""
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "bam"):
        c.dir(d)
    c.node("dev/console", 5, 1)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.file("init", INIT_SCRIPT.replace("@PORT@", TRACE_PORT).encode(), 0o755)
    c.file("bam/workload.sh", workload.encode(), 0o755)
    for m in modules:
        c.file(f"lib/modules/{m.name}", m.read_bytes())
    c.file("lib/modules/load.order", "".join(f"{m.stem}\n" for m in modules).encode())
    return c.finish()


def _recipe_hash(busybox: Path, kernel_id: str) -> str:
    h = hashlib.sha256()
    h.update(INIT_SCRIPT.encode())
    h.update(DEFAULT_WORKLOAD.encode())
    h.update(",".join(MODULES).encode())
    h.update(kernel_id.encode())
    st = busybox.stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def build_image(
    *, cache: Path | None = None, kernel: Path | None = None, force: bool = False
) -> GuestImage:
    """Build (or reuse) the guest image; returns where it is.

    ``kernel`` (or ``$BAM_VM_KERNEL``) boots a given bzImage without modules (no virtio
    devices then: the trace goes over ``ttyS1``). Otherwise the Debian cloud kernel package
    is downloaded with ``apt-get download`` the first time and reused from the cache.
    """
    root = cache or cache_root()
    bb = busybox_path()
    given = kernel or (
        Path(os.environ["BAM_VM_KERNEL"]) if os.environ.get("BAM_VM_KERNEL") else None
    )
    if given is not None:
        if not given.is_file():
            raise SensorUnavailableError(f"guest kernel {given} does not exist")
        kid = f"custom-{hashlib.sha256(given.read_bytes()).hexdigest()[:12]}"
        pkg = str(given)
    else:
        try:
            pkg = kernel_package()
        except SensorUnavailableError:
            cached = _cached(root, bb)  # offline, or apt not set up: the last good build
            if cached is None or force:
                raise
            return cached
        kid = pkg
    d = root / f"{kid.removeprefix('linux-image-')}-{_recipe_hash(bb, kid)}"
    img = GuestImage(d / "vmlinuz", d / "initrd.img", pkg, d)
    if not force and (d / "manifest.json").is_file() and img.kernel.is_file():
        return img
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        if given is not None:
            shutil.copyfile(given, work / "vmlinuz")
            mods: list[Path] = []
        else:
            _run(["apt-get", "download", pkg], cwd=work)
            debs = sorted(work.glob("*.deb"))
            if not debs:
                raise SensorUnavailableError(f"apt-get download {pkg} produced no .deb")
            mods = extract_kernel(debs[0], work)
            for deb in debs:
                deb.unlink()
        (work / "initrd.img").write_bytes(initramfs(bb, mods))
        (work / "manifest.json").write_text(
            json.dumps({"kernel_package": pkg, "modules": [m.stem for m in mods]}, indent=2)
        )
        if d.exists():
            shutil.rmtree(d)
        os.replace(work, d)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    if given is None:  # drop images of older kernels or recipes (~16 MB each)
        for old in root.iterdir():
            if old.is_dir() and old != d and not old.name.startswith((".", "custom-")):
                shutil.rmtree(old, ignore_errors=True)
    return img


def _cached(root: Path, busybox: Path) -> GuestImage | None:
    """The newest complete Debian-kernel image in the cache built by this recipe."""
    best: GuestImage | None = None
    best_t = -1.0
    for m in root.glob("*/manifest.json"):
        try:
            pkg = json.loads(m.read_text())["kernel_package"]
        except (OSError, ValueError, KeyError):
            continue
        d = m.parent
        if not d.name.endswith(_recipe_hash(busybox, pkg)) or not (d / "vmlinuz").is_file():
            continue
        if m.stat().st_mtime > best_t:
            best_t = m.stat().st_mtime
            best = GuestImage(d / "vmlinuz", d / "initrd.img", pkg, d)
    return best
