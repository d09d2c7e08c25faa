"""Minimal ctypes bindings to the system libbpf (``libbpf.so.1``, Debian's ``libbpf1``).

Why ctypes and not a PyPI binding: pylibbpf's per-CPU map lookup is broken and it has no
ring-buffer reader; bcc needs kernel headers this host does not have. libbpf itself is the
reference loader (CO-RE relocations against the kernel's BTF), so BAM calls it directly for the
*control* path only — open, size maps, load, attach, detach, map lookups. The *data* path (the
ring buffer) is read by :mod:`bam.sensors.ringbuf` through mmap, never through a per-event C
callback (measured: a ctypes callback per event loses about half the events at 1 M/s).

Every libbpf log line is captured, so a failed load reports the verifier's own words.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path
from typing import Any, Final

from bam.sensors.errors import SensorError, SensorUnavailableError

BTF_PATH = Path("/sys/kernel/btf/vmlinux")
_LIBBPF_NAMES: Final = ("libbpf.so.1", "libbpf.so")

_vp = ctypes.c_void_p
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
_libc.vsnprintf.restype = ctypes.c_int
_log_lock = threading.Lock()
_log: list[str] = []
_print_cb: Any = None  # keeps the callback alive


def _on_print(level: int, fmt: bytes | None, args: int | None) -> int:
    buf = ctypes.create_string_buffer(1 << 17)  # verifier logs come as one string
    _libc.vsnprintf(buf, len(buf), fmt, args)
    with _log_lock:
        _log.append(buf.value.decode("utf-8", "replace"))
        del _log[:-400]
    return 0


def take_log() -> str:
    """libbpf's log lines since the last call (verifier output on a failed load)."""
    with _log_lock:
        text = "".join(_log)
        _log.clear()
    return text


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with prototypes set; :class:`SensorUnavailableError` if it is missing."""
    global _lib, _print_cb
    if _lib is not None:
        return _lib
    found = None
    for name in (*_LIBBPF_NAMES, ctypes.util.find_library("bpf")):
        if not name:
            continue
        try:
            found = ctypes.CDLL(name, use_errno=True)
            break
        except OSError:
            continue
    if found is None:
        raise SensorUnavailableError(
            "libbpf not found (libbpf.so.1); install it: apt-get install libbpf1 libbpf-dev"
        )
    protos: dict[str, tuple[Any, list[Any]]] = {
        "bpf_object__open_file": (_vp, [ctypes.c_char_p, _vp]),
        "bpf_object__load": (ctypes.c_int, [_vp]),
        "bpf_object__close": (None, [_vp]),
        "bpf_object__find_map_by_name": (_vp, [_vp, ctypes.c_char_p]),
        "bpf_object__find_program_by_name": (_vp, [_vp, ctypes.c_char_p]),
        "bpf_map__set_max_entries": (ctypes.c_int, [_vp, ctypes.c_uint32]),
        "bpf_map__set_map_flags": (ctypes.c_int, [_vp, ctypes.c_uint32]),
        "bpf_map__map_flags": (ctypes.c_uint32, [_vp]),
        "bpf_map__initial_value": (_vp, [_vp, ctypes.POINTER(ctypes.c_size_t)]),
        "bpf_map__fd": (ctypes.c_int, [_vp]),
        "bpf_map__value_size": (ctypes.c_uint32, [_vp]),
        "bpf_map__max_entries": (ctypes.c_uint32, [_vp]),
        "bpf_program__set_autoload": (ctypes.c_int, [_vp, ctypes.c_bool]),
        "bpf_program__attach": (_vp, [_vp]),
        "bpf_program__fd": (ctypes.c_int, [_vp]),
        "bpf_link__destroy": (ctypes.c_int, [_vp]),
        "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, _vp, _vp]),
        "bpf_map_update_elem": (ctypes.c_int, [ctypes.c_int, _vp, _vp, ctypes.c_uint64]),
        "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, _vp, _vp]),
        "libbpf_num_possible_cpus": (ctypes.c_int, []),
        "libbpf_set_print": (_vp, [_PRINT_FN]),
    }
    for fname, (res, args) in protos.items():
        fn = getattr(found, fname)
        fn.restype = res
        fn.argtypes = args
    _print_cb = _PRINT_FN(_on_print)
    found.libbpf_set_print(_print_cb)
    _lib = found
    return found


def check_btf() -> None:
    """Raise :class:`SensorUnavailableError` if the kernel has no BTF (CO-RE cannot relocate)."""
    if not BTF_PATH.exists():
        raise SensorUnavailableError(
            "this kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing; CONFIG_DEBUG_INFO_BTF "
            "is off): the eBPF sensor needs it; BAM will fall back to tracefs or strace"
        )


def check_privilege() -> None:
    """Raise :class:`SensorUnavailableError` unless this process may load tracing BPF programs."""
    if os.geteuid() == 0:
        return
    try:
        eff = int(Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0], 16)
    except (OSError, IndexError, ValueError):
        eff = 0
    cap_bpf, cap_perfmon, cap_sys_admin = 39, 38, 21
    if (eff >> cap_sys_admin) & 1 or ((eff >> cap_bpf) & 1 and (eff >> cap_perfmon) & 1):
        return
    raise SensorUnavailableError(
        "loading eBPF tracing programs needs root (or CAP_BPF + CAP_PERFMON); run bam as root"
    )


def _errno_text() -> str:
    e = ctypes.get_errno()
    return f"{os.strerror(e)} (errno {e})" if e else "unknown error"


class BpfObject:
    """An opened (then loaded) BPF object file; close it with :meth:`close` (or ``with``)."""

    def __init__(self, path: Path) -> None:
        self._l = lib()
        take_log()
        ptr = self._l.bpf_object__open_file(os.fsencode(path), None)
        if not ptr:
            raise SensorError(f"libbpf cannot open BPF object {path}: {_errno_text()}")
        self.path = path
        self._obj: int | None = ptr
        self._links: list[int] = []

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def obj(self) -> int:
        if self._obj is None:
            raise SensorError("BPF object already closed")
        return self._obj

    def _map(self, name: str) -> int:
        m = self._l.bpf_object__find_map_by_name(self.obj, name.encode())
        if not m:
            raise SensorError(f"BPF object {self.path} has no map {name!r} (stale build?)")
        return int(m)

    def _prog(self, name: str) -> int:
        p = self._l.bpf_object__find_program_by_name(self.obj, name.encode())
        if not p:
            raise SensorError(f"BPF object {self.path} has no program {name!r} (stale build?)")
        return int(p)

    # --- before load ---
    def set_max_entries(self, name: str, n: int) -> None:
        if self._l.bpf_map__set_max_entries(self._map(name), n) != 0:
            raise SensorError(f"cannot size BPF map {name!r} to {n}: {_errno_text()}")

    def add_map_flags(self, name: str, flags: int) -> None:
        m = self._map(name)
        if self._l.bpf_map__set_map_flags(m, self._l.bpf_map__map_flags(m) | flags) != 0:
            raise SensorError(f"cannot set flags of BPF map {name!r}: {_errno_text()}")

    def set_rodata(self, data: bytes, map_name: str = ".rodata") -> None:
        """Overwrite the start of the read-only data section (``const volatile`` config)."""
        size = ctypes.c_size_t(0)
        ptr = self._l.bpf_map__initial_value(self._map(map_name), ctypes.byref(size))
        if not ptr or size.value < len(data):
            raise SensorError(f"BPF object {self.path}: {map_name} is smaller than the config")
        ctypes.memmove(ptr, data, len(data))

    def set_autoload(self, prog: str, on: bool) -> None:
        self._l.bpf_program__set_autoload(self._prog(prog), on)

    def load(self) -> None:
        if self._l.bpf_object__load(self.obj) != 0:
            err = _errno_text()
            log = take_log().strip()
            tail = "\n".join(log.splitlines()[-25:])
            raise SensorError(f"the kernel refused BPF object {self.path}: {err}\n{tail}")

    # --- after load ---
    def map_fd(self, name: str) -> int:
        fd = int(self._l.bpf_map__fd(self._map(name)))
        if fd < 0:
            raise SensorError(f"BPF map {name!r} has no fd (object not loaded?)")
        return fd

    def value_size(self, name: str) -> int:
        return int(self._l.bpf_map__value_size(self._map(name)))

    def max_entries(self, name: str) -> int:
        return int(self._l.bpf_map__max_entries(self._map(name)))

    def attach(self, prog: str) -> None:
        link = self._l.bpf_program__attach(self._prog(prog))
        if not link:
            err = _errno_text()
            raise SensorError(f"cannot attach BPF program {prog!r}: {err}\n{take_log()[-800:]}")
        self._links.append(int(link))

    def detach_all(self) -> None:
        """Detach every attached program (the tracepoints stop costing anything)."""
        while self._links:
            self._l.bpf_link__destroy(self._links.pop())

    def lookup(self, name: str, key: int, out: ctypes.Array[ctypes.c_char]) -> None:
        k = ctypes.c_uint32(key)
        if self._l.bpf_map_lookup_elem(self.map_fd(name), ctypes.byref(k), out) != 0:
            raise SensorError(f"lookup in BPF map {name!r} failed: {_errno_text()}")

    def update(self, name: str, key: int, value: bytes) -> None:
        k = ctypes.c_uint32(key)
        buf = ctypes.create_string_buffer(value, len(value))
        if self._l.bpf_map_update_elem(self.map_fd(name), ctypes.byref(k), buf, 0) != 0:
            raise SensorError(f"update of BPF map {name!r} failed: {_errno_text()}")

    def items(self, name: str, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of a hash map, raw bytes (one lookup per key: small maps only)."""
        fd = self.map_fd(name)
        out: list[tuple[bytes, bytes]] = []
        key = ctypes.create_string_buffer(key_size)
        nxt = ctypes.create_string_buffer(key_size)
        val = ctypes.create_string_buffer(value_size)
        prev: Any = None  # NULL: the first key
        while self._l.bpf_map_get_next_key(fd, prev, nxt) == 0:
            ctypes.memmove(key, nxt, key_size)
            prev = key
            if self._l.bpf_map_lookup_elem(fd, key, val) == 0:  # may vanish meanwhile
                out.append((key.raw, val.raw))
        return out

    def close(self) -> None:
        """Detach and unload: no program, link or map outlives this call."""
        self.detach_all()
        if self._obj is not None:
            self._l.bpf_object__close(self._obj)
            self._obj = None


def possible_cpus() -> int:
    """Number of possible CPUs (the stride of per-CPU map values)."""
    n = int(lib().libbpf_num_possible_cpus())
    if n <= 0:
        raise SensorError(f"cannot count possible CPUs: {os.strerror(-n)}")
    return n
