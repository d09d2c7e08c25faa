"""Measurements: sha256 of what a workload runs from, of BAM itself and of its models.

- a process: its executable (through ``/proc/PID/exe``, i.e. the inode actually running, even if
  the path was replaced or deleted) and every file-backed executable mapping in
  ``/proc/PID/maps`` (through ``/proc/PID/map_files`` when readable, else the path); executable
  mappings backed by no file are counted (JIT, injected code);
- a VM: its disk image(s), kernel, initrd and firmware files;
- BAM: every source and data file of the ``bam`` package, folded into one digest, plus the
  Python interpreter;
- models: the files of a baseline or classifier, under its ``model_id``.

Files are hashed from an open descriptor; :class:`MeasurementCache` reuses a digest while the
file's identity and times (``st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns``) are unchanged,
so a multi-GB disk image is read once, not every report. ``st_ctime`` cannot be set from user
space, so an in-place rewrite that restores ``mtime`` still invalidates the cache.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bam
from bam.evidence.canonical import jcs
from bam.evidence.claims import (
    BamMeasurement,
    FileMeasurement,
    FileRole,
    Measurements,
    ModelMeasurement,
    Target,
)
from bam.evidence.errors import MeasurementError

_StatKey = tuple[int, int, int, int, int]
_CODE_SUFFIXES = frozenset({".py", ".json", ".typed", ".rego", ".bpf.c", ".c", ".toml"})


class MeasurementCache:
    """Thread-safe digest cache keyed by file identity and times (see module doc)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: dict[_StatKey, str] = {}

    def get(self, key: _StatKey) -> str | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: _StatKey, digest: str) -> None:
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = digest


DEFAULT_CACHE = MeasurementCache()


def _hash_fd(fd: int, cache: MeasurementCache | None) -> tuple[str, int]:
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit, st.st_size
    with os.fdopen(os.dup(fd), "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if cache is not None:
        cache.put(key, digest)
    return digest, st.st_size


def _open_regular(path: str | Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MeasurementError("measure_failed", f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def measure_file(
    path: str | Path,
    role: FileRole = "file",
    *,
    cache: MeasurementCache | None = DEFAULT_CACHE,
    display_path: str | None = None,
    deleted: bool = False,
) -> FileMeasurement:
    """sha256 and size of one regular file."""
    try:
        fd = _open_regular(path)
    except OSError as e:
        raise MeasurementError("measure_failed", f"{path}: {e.strerror or e}") from None
    try:
        digest, size = _hash_fd(fd, cache)
    except OSError as e:
        raise MeasurementError("measure_failed", f"{path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return FileMeasurement(
        role=role,
        path=display_path or str(path),
        sha256=digest,
        size=size,
        deleted=deleted,
    )


@dataclass(frozen=True)
class ProcessMeasurement:
    """A process's executable and mapped executable files, and its anonymous exec mappings."""

    pid: int
    name: str
    files: list[FileMeasurement]
    anon_exec_mappings: int


_DELETED = " (deleted)"


def measure_process(
    pid: int, *, cache: MeasurementCache | None = DEFAULT_CACHE
) -> ProcessMeasurement:
    """Measure process ``pid``: ``exe`` then each distinct file-backed executable mapping."""
    proc = Path(f"/proc/{int(pid)}")
    try:
        name = (proc / "comm").read_text().strip() or str(pid)
        exe_link = os.readlink(proc / "exe")
        maps = (proc / "maps").read_text()
    except FileNotFoundError:
        raise MeasurementError("measure_failed", f"process {pid} does not exist") from None
    except OSError as e:
        raise MeasurementError("measure_failed", f"process {pid}: {e.strerror or e}") from None
    exe_deleted = exe_link.endswith(_DELETED)
    exe_path = exe_link.removesuffix(_DELETED)
    files = [
        measure_file(proc / "exe", "exe", cache=cache, display_path=exe_path, deleted=exe_deleted)
    ]
    seen: set[tuple[str, str]] = set()
    anon = 0
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or "x" not in parts[1]:
            continue
        mapped = parts[5] if len(parts) == 6 else ""
        if not mapped.startswith("/"):
            if not mapped.startswith("["):  # [vdso], [vsyscall] are the kernel's, not code
                anon += 1
            continue
        ident = (parts[3], parts[4])  # device, inode
        if ident in seen:
            continue
        seen.add(ident)
        deleted = mapped.endswith(_DELETED)
        path = mapped.removesuffix(_DELETED)
        if path == exe_path and not deleted:
            continue  # the executable itself, already measured through /proc/PID/exe
        files.append(_measure_mapping(proc, parts[0], path, deleted, cache))
    return ProcessMeasurement(pid=int(pid), name=name, files=files, anon_exec_mappings=anon)


def _measure_mapping(
    proc: Path, addr: str, path: str, deleted: bool, cache: MeasurementCache | None
) -> FileMeasurement:
    # map_files opens the very inode that is mapped (works for deleted or replaced files);
    # it needs CAP_SYS_ADMIN on most kernels, so fall back to the path.
    try:
        return measure_file(
            proc / "map_files" / addr, "lib", cache=cache, display_path=path, deleted=deleted
        )
    except MeasurementError:
        if deleted:
            raise MeasurementError(
                "measure_failed",
                f"{path} is mapped but deleted and {proc}/map_files is not readable",
            ) from None
        return measure_file(path, "lib", cache=cache)


def measure_vm(
    *,
    disks: Sequence[str | Path] = (),
    kernel: str | Path | None = None,
    initrd: str | Path | None = None,
    firmware: Sequence[str | Path] = (),
    cache: MeasurementCache | None = DEFAULT_CACHE,
) -> list[FileMeasurement]:
    """Measure a VM's disk images, kernel, initrd and firmware files."""
    out: list[FileMeasurement] = [measure_file(d, "disk", cache=cache) for d in disks]
    if kernel is not None:
        out.append(measure_file(kernel, "kernel", cache=cache))
    if initrd is not None:
        out.append(measure_file(initrd, "initrd", cache=cache))
    out.extend(measure_file(f, "firmware", cache=cache) for f in firmware)
    return out


def _bam_code_files(root: Path) -> Iterable[Path]:
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts or not p.is_file():
            continue
        if p.suffix in _CODE_SUFFIXES or "".join(p.suffixes[-2:]) in _CODE_SUFFIXES:
            yield p


def measure_bam(*, cache: MeasurementCache | None = DEFAULT_CACHE) -> BamMeasurement:
    """Digest of BAM's own code (``bam`` package sources and data) and of the interpreter.

    ``code_sha256`` = sha256(JCS({relative path: sha256 of file})). Byte-compiled caches are not
    included (they are regenerated); see docs/threat-model.md.
    """
    root = Path(bam.__file__).resolve().parent
    digests: dict[str, str] = {}
    for p in _bam_code_files(root):
        digests[p.relative_to(root).as_posix()] = measure_file(p, "bam", cache=cache).sha256
    python = Path(sys.executable).resolve()
    return BamMeasurement(
        version=bam.__version__,
        code_sha256=hashlib.sha256(jcs(digests)).hexdigest(),
        code_files=len(digests),
        python=measure_file(python, "python", cache=cache),
    )


def measure_model(
    model_id: str,
    paths: Sequence[str | Path],
    role: str = "baseline",
    *,
    cache: MeasurementCache | None = DEFAULT_CACHE,
) -> ModelMeasurement:
    """The files of one model (e.g. its JSON metadata and ``.npz`` arrays) under its id."""
    return ModelMeasurement(
        model_id=model_id,
        role=role,
        files=[measure_file(p, "model", cache=cache) for p in paths],
    )


def collect_measurements(
    target: Target,
    *,
    process: ProcessMeasurement | None = None,
    files: Sequence[FileMeasurement] = (),
    models: Sequence[ModelMeasurement] = (),
    cache: MeasurementCache | None = DEFAULT_CACHE,
) -> Measurements:
    """Assemble the ``measurements`` submodule (BAM's own code is always included)."""
    all_files = list(process.files if process else []) + list(files)
    return Measurements(
        target=target,
        files=all_files,
        anon_exec_mappings=process.anon_exec_mappings if process else 0,
        bam=measure_bam(cache=cache),
        models=list(models),
    )
