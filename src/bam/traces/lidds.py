"""LID-DS 2021 reader: one recording = one ``.zip`` with ``<name>.sc``, ``.json`` and ``.res``.

LID-DS (Leipzig Intrusion Detection Data Set, 2021 edition) records containerised services with
sysdig. Each ``.sc`` line is one sysdig event::

    1631209047761484608 0 10 apache2 10 open < fd=9(<f>/etc/x) name=/etc/x flags=1(O_RDONLY)

that is ``timestamp_ns user_id process_id process_name thread_id event_name direction params...``
(the order of the dataset's own loader, ``dataloader/syscall_2021.py``; lines with the direction
*before* the name are accepted too). The reader:

* keeps **enter** events (``>``) as calls and attaches the return value of the matching exit
  event (``<``, same thread, same name; its first parameter ``res=``/``fd=``/...), since one
  event per call is what the detectors model; an exit without its enter (the recording began
  mid-call) is counted in ``meta["orphan_exits"]``, not turned into a call;
* skips sysdig's non-syscall events (``switch``, ``procexit``, ``signaldeliver``, ...) and
  counts them in ``meta["skipped_events"]``;
* maps sysdig's few renamed calls (``pread`` -> ``pread64``, ...) and gives names BAM's table
  lacks the same fallback ids as the strace reader (``meta["unknown_names"]``);
* labels the recording ``"attack"`` if its ``.json`` says ``"exploit": true``, else
  ``"normal"``, and puts the exploit start time (epoch seconds, like the event timestamps) in
  ``meta["exploit_time"]`` so an evaluation can tell when the attack began;
* parses ``.res`` (resource samples) into ``meta["resources"]`` (column -> float64 array, NULL
  -> NaN), or notes in ``meta["resources_note"]`` why it could not.

The archive is read in memory, member by member, and never extracted: member names (including
``../`` tricks) are only compared, never used as paths. Each member's declared size is checked
against a limit before reading, and the bytes actually produced are counted, so a zip bomb is
refused instead of exhausting memory or time.
"""

from __future__ import annotations

import json
import lzma
import math
import re
import zipfile
import zlib
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

import numpy as np
import numpy.typing as npt

from bam.errors import TraceFormatError
from bam.events import SyscallBatch, Trace
from bam.traces.strace import RET_UNKNOWN, resolve_name

MAX_SC_BYTES: Final = 4 << 30
"""Largest ``.sc`` member accepted (uncompressed); real LID-DS recordings are far smaller."""
MAX_JSON_BYTES: Final = 16 << 20
MAX_RES_BYTES: Final = 256 << 20

# sysdig events that are not system calls (scheduler, process lifecycle, sysdig bookkeeping).
NON_SYSCALL_EVENTS: Final = frozenset(
    {
        "switch",
        "procexit",
        "signaldeliver",
        "drop",
        "scapevent",
        "procinfo",
        "container",
        "cpu_hotplug",
        "notification",
        "infra",
        "page_fault",
        "tracer",
        "k8s",
        "mesos",
        "sysdigevent",
        "useradded",
        "userdeleted",
        "groupadded",
        "groupdeleted",
    }
)
# sysdig names that differ from the kernel's.
SYSDIG_ALIASES: Final = {
    "pread": "pread64",
    "pwrite": "pwrite64",
    "prlimit": "prlimit64",
    "llseek": "_llseek",
}

_SC_LINE = re.compile(
    rb"(?P<ts>\d{1,20}) (?P<uid>\S{1,20}) (?P<pid>\d{1,10}) (?P<comm>.*?) (?P<tid>\d{1,10}) "
    rb"(?:(?P<name>[A-Za-z_][A-Za-z0-9_]{0,63}) (?P<dir>[<>])"
    rb"|(?P<dir2>[<>]) (?P<name2>[A-Za-z_][A-Za-z0-9_]{0,63}))"
    # the first parameter's value, when it is a decimal number (res=, fd=, ...): the result
    rb"(?: [A-Za-z_][A-Za-z0-9_.]{0,63}=(?P<ret>-?\d{1,20})(?=[ (\r]|$))?(?P<rest>[^\n]*)\n?",
    re.ASCII,
)
_I32_MAX: Final = (1 << 31) - 1
_I64_MAX: Final = (1 << 63) - 1


class _ScParse:
    """Accumulates the events of one ``.sc`` stream; :meth:`batch` turns them into arrays."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.ts = array("d")
        self.pid = array("q")
        self.tid = array("q")
        self.sid = array("i")
        self.ret = array("q")
        self.ids: dict[bytes, int] = {}
        self.unknown: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.pending: dict[int, tuple[int, bytes]] = {}
        self.orphan_exits = 0
        self.lines = 0

    def _sid(self, name: bytes) -> int:
        text = name.decode("ascii")
        cid = resolve_name(SYSDIG_ALIASES.get(text, text), self.unknown)
        self.ids[name] = cid
        return cid

    def feed(self, lines: Iterable[bytes], first_lineno: int = 1) -> None:
        """Parse ``lines`` (bytes, newline optional); errors name ``self.source`` and the line."""
        match = _SC_LINE.fullmatch
        ids = self.ids
        pending = self.pending
        lineno = first_lineno - 1
        for lineno, line in enumerate(lines, first_lineno):
            m = match(line)
            if m is None:
                if not line.strip():
                    continue
                raise TraceFormatError(self.source, _describe_bad(line), lineno)
            ts_tok, _uid, pid_tok, _comm, tid_tok, name, d, d2, name2, ret_tok, _rest = m.groups()
            if name is None:
                name, d = name2, d2
            tid = int(tid_tok)
            if d == b">":
                if name in ids:
                    sid = ids[name]
                else:
                    text = name.decode("ascii")
                    if text in NON_SYSCALL_EVENTS:
                        self.skipped[text] = self.skipped.get(text, 0) + 1
                        continue
                    sid = self._sid(name)
                pending[tid] = (len(self.sid), name)
                self.ts.append(int(ts_tok) / 1e9)
                self.pid.append(int(pid_tok))
                self.tid.append(tid)
                self.sid.append(sid)
                self.ret.append(RET_UNKNOWN)
            else:
                start = pending.get(tid)
                if start is not None and start[1] == name:
                    del pending[tid]
                    if ret_tok is not None:
                        v = int(ret_tok)
                        self.ret[start[0]] = v if -_I64_MAX <= v <= _I64_MAX else RET_UNKNOWN
                elif name.decode("ascii") not in NON_SYSCALL_EVENTS:
                    self.orphan_exits += 1
        self.lines = max(self.lines, lineno)

    def batch(self) -> SyscallBatch:
        """The events parsed so far, as one :class:`SyscallBatch`."""
        pid = np.frombuffer(self.pid, dtype=np.int64)
        tid = np.frombuffer(self.tid, dtype=np.int64)
        for name, arr in (("process id", pid), ("thread id", tid)):
            if arr.size and int(arr.max()) > _I32_MAX:
                raise TraceFormatError(self.source, f"{name} {int(arr.max())} out of range")
        return SyscallBatch(
            ts=np.frombuffer(self.ts, dtype=np.float64).copy(),
            pid=pid.astype(np.int32),
            tid=tid.astype(np.int32),
            sid=np.frombuffer(self.sid, dtype=np.int32).copy(),
            ret=np.frombuffer(self.ret, dtype=np.int64).copy(),
        )


def _describe_bad(line: bytes) -> str:
    text = line.rstrip(b"\r\n")
    if b"\x00" in text:
        return "not a LID-DS syscall line: binary content"
    try:
        shown = repr(text[:80].decode("utf-8"))
    except UnicodeDecodeError:
        return "not a LID-DS syscall line: binary content"
    return f"not a LID-DS syscall line: {shown}"


def parse_sc_lines(
    lines: Iterable[bytes], source: str = "<sc>"
) -> tuple[SyscallBatch, dict[str, Any]]:
    """Parse sysdig text lines of a LID-DS ``.sc`` file: the events and their parse notes."""
    p = _ScParse(source)
    p.feed(lines)
    return p.batch(), _parse_notes(p)


def _parse_notes(p: _ScParse) -> dict[str, Any]:
    notes: dict[str, Any] = {"lines": p.lines, "unknown_names": p.unknown}
    if p.skipped:
        notes["skipped_events"] = p.skipped
    if p.orphan_exits:
        notes["orphan_exits"] = p.orphan_exits
    return notes


def _iter_lines(fh: IO[bytes], limit: int, source: str) -> Iterator[bytes]:
    """Lines of a zip member read in large chunks (zipfile's own readline is slow), with the
    bytes actually produced counted against ``limit`` whatever the header declared."""
    carry = b""
    total = 0
    while True:
        chunk = fh.read(1 << 22)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise TraceFormatError(source, f"member inflates beyond {limit} bytes; refused")
        parts = (carry + chunk).split(b"\n")
        carry = parts.pop()
        yield from parts
    if carry:
        yield carry


def _member(zf: zipfile.ZipFile, stem: str, ext: str) -> zipfile.ZipInfo | None:
    """The recording's ``<stem><ext>`` member, else the only member with that extension."""
    infos = [i for i in zf.infolist() if not i.is_dir() and i.filename.endswith(ext)]
    for i in infos:
        if PurePosixPath(i.filename).name == stem + ext:
            return i
    return infos[0] if len(infos) == 1 else None


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, source: str) -> bytes:
    if info.file_size > limit:
        raise TraceFormatError(source, f"declares {info.file_size} bytes, above {limit}; refused")
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TraceFormatError(source, f"member inflates beyond {limit} bytes; refused")
    return data


def _parse_json(raw: bytes, source: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TraceFormatError(source, "metadata is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Some LID-DS metadata files use single quotes (the dataset's loader swaps them too).
        try:
            data = json.loads(text.replace("'", '"'))
        except json.JSONDecodeError:
            raise TraceFormatError(source, f"bad JSON: {e.msg}", e.lineno) from None
    except RecursionError:
        raise TraceFormatError(source, "bad JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise TraceFormatError(source, "metadata must be a JSON object")
    return data


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _metadata(data: dict[str, Any], source: str) -> tuple[str | None, dict[str, Any]]:
    """Label and meta entries from a recording's JSON metadata."""
    meta: dict[str, Any] = {}
    exploit = data.get("exploit")
    if exploit is None:
        label = None
        meta["label_note"] = 'metadata has no "exploit" field'
    elif isinstance(exploit, bool):
        label = "attack" if exploit else "normal"
    else:
        raise TraceFormatError(source, f'"exploit" must be true or false, not {exploit!r:.40}')
    times_raw = data.get("time")
    times: dict[str, Any] = times_raw if isinstance(times_raw, dict) else {}
    starts: list[float] = []
    names: list[str] = []
    exploits = times.get("exploit")
    if isinstance(exploits, list):
        for e in exploits:
            if isinstance(e, dict) and (t := _seconds(e.get("absolute"))) is not None:
                starts.append(t)
                names.append(str(e.get("name", "")))
    meta["exploit_time"] = min(starts) if starts else None
    meta["exploit_times"] = starts
    meta["exploit_names"] = names
    for key in ("warmup_end", "container_ready"):
        entry = times.get(key)
        meta[key] = _seconds(entry.get("absolute")) if isinstance(entry, dict) else None
    for key in ("exploit_name", "image", "recording_time"):
        if key in data and isinstance(data[key], str | int | float):
            meta[key] = data[key]
    containers = data.get("container")
    if isinstance(containers, list):
        meta["containers"] = [c for c in containers if isinstance(c, dict)]
    return label, meta


def _parse_res(raw: bytes) -> dict[str, npt.NDArray[np.float64]]:
    """``.res``: a CSV header then one sample per line; ``NULL`` (no measurement) -> NaN."""
    lines = [ln.strip() for ln in raw.decode("utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError("empty")
    header = [h.strip() for h in lines[0].split(",")]
    if len(set(header)) != len(header) or not all(header):
        raise ValueError("bad header")
    cols: list[list[float]] = [[] for _ in header]
    for n, ln in enumerate(lines[1:], 2):
        cells = ln.split(",")
        if len(cells) != len(header):
            raise ValueError(f"line {n} has {len(cells)} fields, header {len(header)}")
        for col, cell in zip(cols, cells, strict=True):
            c = cell.strip()
            col.append(math.nan if c in ("NULL", "", "None", "nan") else float(c))
    return {h: np.asarray(c, dtype=np.float64) for h, c in zip(header, cols, strict=True)}


def read_lidds(path: str | Path, *, max_sc_bytes: int = MAX_SC_BYTES) -> Trace:
    """Read one LID-DS 2021 recording (``.zip``); see the module docstring."""
    p = Path(path)
    stem = p.stem
    try:
        zf = zipfile.ZipFile(p)
    except zipfile.BadZipFile:
        raise TraceFormatError(p, "not a LID-DS recording: not a zip file") from None
    except OSError as e:
        raise TraceFormatError(p, f"cannot read: {e.strerror or e}") from None
    try:
        with zf:
            return _read_zip(zf, p, stem, max_sc_bytes)
    except TraceFormatError:
        raise
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as e:
        raise TraceFormatError(p, f"corrupt zip: {e}") from None
    except (NotImplementedError, RuntimeError) as e:  # unsupported compression, encryption
        raise TraceFormatError(p, f"cannot read zip member: {e}") from None


def _read_zip(zf: zipfile.ZipFile, p: Path, stem: str, max_sc_bytes: int) -> Trace:
    sc = _member(zf, stem, ".sc")
    if sc is None:
        raise TraceFormatError(p, f"not a LID-DS recording: no {stem}.sc inside")
    sc_src = f"{p}[{sc.filename}]"
    if sc.file_size > max_sc_bytes:
        raise TraceFormatError(
            sc_src, f"declares {sc.file_size} bytes, above the {max_sc_bytes}-byte limit; refused"
        )

    label: str | None = None
    meta: dict[str, Any] = {"format": "lidds", "source": str(p), "lidds_recording": stem}
    js = _member(zf, stem, ".json")
    if js is None:
        meta["label_note"] = f"no {stem}.json: label unknown"
    else:
        js_src = f"{p}[{js.filename}]"
        label, extra = _metadata(
            _parse_json(_read_small(zf, js, MAX_JSON_BYTES, js_src), js_src), js_src
        )
        meta.update(extra)

    res = _member(zf, stem, ".res")
    if res is None:
        meta["resources_note"] = f"no {stem}.res"
    else:
        res_src = f"{p}[{res.filename}]"
        try:
            meta["resources"] = _parse_res(_read_small(zf, res, MAX_RES_BYTES, res_src))
        except (ValueError, UnicodeDecodeError) as e:
            meta["resources_note"] = f"{res.filename} ignored: {e}"
        except TraceFormatError as e:
            meta["resources_note"] = f"{res.filename} ignored: {e.reason}"

    parser = _ScParse(sc_src)
    with zf.open(sc) as fh:
        parser.feed(_iter_lines(fh, max_sc_bytes, sc_src))
    if not parser.sid:
        raise TraceFormatError(sc_src, "no system calls in the recording")
    meta.update(_parse_notes(parser))
    split = _split_of(p)
    if split is not None:
        meta["split"] = split
    return Trace(name=str(p), events=parser.batch(), label=label, meta=meta)


def _split_of(p: Path) -> str | None:
    """LID-DS folder role: training / validation / test (normal or normal_and_attack)."""
    parent = p.parent.name
    if parent in ("training", "validation"):
        return parent
    if parent in ("normal", "normal_and_attack") and p.parent.parent.name == "test":
        return f"test/{parent}"
    return None


def iter_lidds(path: str | Path) -> Iterator[Trace]:
    """A recording ``.zip``, or every ``*.zip`` below a folder (sorted, so runs reproduce)."""
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.rglob("*.zip")):
            yield read_lidds(f)
    else:
        yield read_lidds(p)
