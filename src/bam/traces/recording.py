"""BAM's own recording format (``.bamrec``): what live sensors record, compact and versioned.

A recording is one ``.npz`` (a zip of ``.npy`` arrays, written with ``np.savez_compressed``):

========  =======  ==============================================================
array     dtype    meaning
========  =======  ==============================================================
``ts``    float64  seconds (epoch or relative, as recorded; NaN where unknown)
``pid``   int32    process (thread-group) id
``tid``   int32    thread id
``sid``   int32    system call, as an index into the header's ``"syscalls"`` list
``ret``   int64    return value (optional; ``RET_UNKNOWN`` where unknown)
``meta``  uint8    UTF-8 JSON header (below)
``m<N>``  any      numeric arrays referenced from the header's ``"meta"`` (optional)
========  =======  ==============================================================

The header is ``{"format": "bam-recording", "schema": 1, "arch", "created", "command", "label",
"name", "syscalls": [names...], "meta": {...}}``.

Why syscall *names* and not canonical ids: canonical ids are positions in BAM's sorted syscall
vocabulary, which shifts whenever a newer kernel table is bundled. Names (``read``,
``x86_64#451`` for an unnamed number, ``#<id>`` for a hashed unknown name) mean the same thing to
every BAM version, so an old recording reads correctly after an upgrade.

Safety: files are loaded with ``allow_pickle=False`` always, so loading never executes code;
every array's presence, dtype, shape and length is checked, the declared sizes of the zip
members are bounded, and an unknown format tag or a newer schema is refused with a clear error.
Writes are atomic (temporary file in the same folder, then ``os.replace``), so a crash never
leaves a half-written recording under the final name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import math
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.lib.format as npformat

from bam.errors import TraceFormatError
from bam.events import SyscallBatch, Trace
from bam.syscalls import ARCHES, Arch, canonical_ids, id_of, name_of
from bam.traces.strace import RET_UNKNOWN, fallback_id, hashed_id

FORMAT_TAG: Final = "bam-recording"
SCHEMA: Final = 1
SUFFIX: Final = ".bamrec"
MAX_BYTES: Final = 8 << 30
"""Largest total uncompressed size accepted (refuses zip bombs before inflating anything)."""

_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "ts": np.dtype(np.float64),
    "pid": np.dtype(np.int32),
    "tid": np.dtype(np.int32),
    "sid": np.dtype(np.int32),
    "ret": np.dtype(np.int64),
}
_UNNAMED = re.compile(r"(x86_64|i386)#(\d{1,4})")
_HASHED = re.compile(r"#(\d{1,10})")
_ARRAY_REF = "__ndarray__"
_FLOAT_REF = "__float__"
_EXTRA = re.compile(r"m\d{1,6}\.npy")

__all__ = [
    "FORMAT_TAG",
    "RET_UNKNOWN",
    "SCHEMA",
    "iter_recordings",
    "read_recording",
    "write_recording",
]


# --- names <-> canonical ids --------------------------------------------------------------------


def _id_of_token(tok: str) -> int:
    """Inverse of :func:`bam.syscalls.name_of`, tolerant of names this BAM does not know."""
    try:
        return id_of(tok)
    except KeyError:
        pass
    m = _UNNAMED.fullmatch(tok)
    if m and int(m.group(2)) < 1024:
        arch: Arch = "x86_64" if m.group(1) == "x86_64" else "i386"
        return int(canonical_ids([int(m.group(2))], arch)[0])
    m = _HASHED.fullmatch(tok)
    if m and int(m.group(1)) <= np.iinfo(np.int32).max:
        return int(m.group(1))
    # A name from a newer BAM's table: the same fallback the strace reader uses.
    cid = fallback_id(tok)
    return cid if cid is not None else hashed_id(tok)


# --- meta <-> JSON (numeric numpy arrays stored beside the header) ------------------------------


def _encode_meta(value: Any, arrays: dict[str, np.ndarray[Any, Any]], where: str) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc" or value.dtype.hasobject:
            raise ValueError(f"meta {where}: array of dtype {value.dtype} cannot be stored")
        key = f"m{len(arrays)}"
        arrays[key] = value
        return {_ARRAY_REF: key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"meta {where}: keys must be strings, not {type(k).__name__}")
            if k in (_ARRAY_REF, _FLOAT_REF):
                raise ValueError(f"meta {where}: key {k!r} is reserved")
            out[k] = _encode_meta(v, arrays, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_encode_meta(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_FLOAT_REF: repr(value)}  # JSON has no NaN
    raise ValueError(f"meta {where}: {type(value).__name__} cannot be stored in a recording")


def _decode_meta(value: Any, arrays: Mapping[str, np.ndarray[Any, Any]], src: Path) -> Any:
    if isinstance(value, dict):
        if set(value) == {_FLOAT_REF} and value[_FLOAT_REF] in ("nan", "inf", "-inf"):
            return float(value[_FLOAT_REF])
        if set(value) == {_ARRAY_REF}:
            key = value[_ARRAY_REF]
            if not isinstance(key, str) or key not in arrays:
                raise TraceFormatError(src, f"header refers to a missing array {key!r:.40}")
            return arrays[key]
        return {k: _decode_meta(v, arrays, src) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_meta(v, arrays, src) for v in value]
    return value


# --- write --------------------------------------------------------------------------------------


def write_recording(
    path: str | Path,
    trace: Trace,
    *,
    arch: Arch | None = None,
    command: str | list[str] | None = None,
    created: dt.datetime | None = None,
) -> Path:
    """Write ``trace`` to ``path`` atomically; returns the path.

    ``arch`` and ``command`` default to ``trace.meta["arch"]``/``["command"]`` (arch: x86_64).
    ``trace.meta`` must hold JSON-like values and numeric numpy arrays; anything else raises
    ``ValueError`` naming the offending key, before any file is touched.
    """
    p = Path(path)
    ev = trace.events
    meta = dict(trace.meta)
    recorded = meta.pop("recording", None)
    recorded = recorded if isinstance(recorded, dict) else {}
    arch = arch or meta.get("arch") or recorded.get("arch") or "x86_64"
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHES)}")
    command = command if command is not None else meta.get("command", recorded.get("command"))
    created_at = (created or dt.datetime.now(dt.UTC)).isoformat()

    uniq, codes = np.unique(ev.sid, return_inverse=True)
    extra: dict[str, np.ndarray[Any, Any]] = {}
    header = {
        "format": FORMAT_TAG,
        "schema": SCHEMA,
        "arch": arch,
        "created": created_at,
        "command": command,
        "label": trace.label,
        "name": trace.name,
        "events": len(ev),
        "syscalls": [name_of(int(c)) for c in uniq],
        "meta": _encode_meta(meta, extra, "meta"),
    }
    header_bytes = json.dumps(header, allow_nan=False).encode("utf-8")
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "ts": np.ascontiguousarray(ev.ts, dtype=np.float64),
        "pid": np.ascontiguousarray(ev.pid, dtype=np.int32),
        "tid": np.ascontiguousarray(ev.tid, dtype=np.int32),
        "sid": codes.astype(np.int32).reshape(-1),
        "meta": np.frombuffer(header_bytes, dtype=np.uint8),
        **extra,
    }
    if ev.ret is not None:
        arrays["ret"] = np.ascontiguousarray(ev.ret, dtype=np.int64)

    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, allow_pickle=False, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


# --- read ---------------------------------------------------------------------------------------


def _load_array(zf: zipfile.ZipFile, key: str, src: Path) -> np.ndarray[Any, Any]:
    """One ``.npy`` member, parsed by hand so nothing is allocated before it is checked.

    ``np.load`` would trust the header's shape and allocate it up front; a few hundred bytes
    could then claim terabytes. Here the header's shape must match the bytes actually present,
    object dtypes (pickles) are refused, and the member's inflated size was bounded earlier.
    """
    info = zf.getinfo(f"{key}.npy")
    with zf.open(info) as fh:
        data = fh.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise TraceFormatError(src, f"array {key!r}: member size does not match its header")
    bio = io.BytesIO(data)
    try:
        version = npformat.read_magic(bio)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(bio)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(bio)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as e:
        raise TraceFormatError(src, f"array {key!r}: bad .npy header ({e})") from None
    if dtype.hasobject:
        raise TraceFormatError(src, f"array {key!r} holds Python objects; refused (no pickle)")
    count = math.prod(shape)
    offset = bio.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise TraceFormatError(
            src,
            f"array {key!r}: header claims shape {shape}, data holds {len(data) - offset} bytes",
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C").copy()


def _column(arrays: Mapping[str, np.ndarray[Any, Any]], key: str, src: Path) -> Any:
    arr = arrays.get(key)
    if arr is None:
        raise TraceFormatError(src, f"missing array {key!r}")
    want = _DTYPES.get(key)
    if want is not None and arr.dtype != want:
        raise TraceFormatError(src, f"array {key!r} has dtype {arr.dtype}, expected {want}")
    if arr.ndim != 1:
        raise TraceFormatError(src, f"array {key!r} has shape {arr.shape}, expected 1-D")
    return arr


def _header(raw: np.ndarray[Any, Any], src: Path) -> dict[str, Any]:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise TraceFormatError(src, "not a BAM recording: header is not UTF-8 bytes")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise TraceFormatError(src, "not a BAM recording: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise TraceFormatError(src, "not a BAM recording: header is not a JSON object")
    tag = header.get("format")
    if tag != FORMAT_TAG:
        raise TraceFormatError(src, f"not a BAM recording: format tag is {tag!r:.60}")
    schema = header.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise TraceFormatError(src, f"invalid schema version {schema!r:.40}")
    if schema > SCHEMA:
        raise TraceFormatError(
            src, f"schema {schema} is newer than this BAM supports ({SCHEMA}); upgrade BAM"
        )
    names = header.get("syscalls")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TraceFormatError(src, 'header "syscalls" must be a list of names')
    return header


def read_recording(path: str | Path, *, max_bytes: int = MAX_BYTES) -> Trace:
    """Read a ``.bamrec`` recording; any problem raises :class:`TraceFormatError` naming it."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04":
            raise TraceFormatError(p, "not a BAM recording: not a zip/npz file")
        with zipfile.ZipFile(p) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            if len(infos) != len(zf.infolist()):
                dup = next(n for n in infos if zf.namelist().count(n) > 1)
                raise TraceFormatError(p, f"not a BAM recording: duplicate member {dup!r}")
            declared = sum(i.file_size for i in infos.values())
            if declared > max_bytes:
                raise TraceFormatError(
                    p, f"declares {declared} bytes uncompressed, above the {max_bytes}-byte limit"
                )
            if "meta.npy" not in infos:
                raise TraceFormatError(p, "not a BAM recording: no header (array 'meta')")
            wanted = [k for k in ("meta", *_DTYPES) if f"{k}.npy" in infos]
            wanted += [n[:-4] for n in infos if _EXTRA.fullmatch(n)]
            arrays = {k: _load_array(zf, k, p) for k in wanted}
    except TraceFormatError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
        raise TraceFormatError(p, f"corrupt recording: {e}") from None
    except (NotImplementedError, RuntimeError) as e:  # unsupported compression, encryption
        raise TraceFormatError(p, f"cannot read recording: {e}") from None
    except OSError as e:
        raise TraceFormatError(p, f"cannot read: {e.strerror or e}") from None

    header = _header(arrays["meta"], p)
    cols = {k: _column(arrays, k, p) for k in ("ts", "pid", "tid", "sid")}
    ret = _column(arrays, "ret", p) if "ret" in arrays else None
    n = len(cols["sid"])
    for k, arr in (*cols.items(), *((("ret", ret),) if ret is not None else ())):
        if len(arr) != n:
            raise TraceFormatError(p, f"array {k!r} has {len(arr)} rows, 'sid' has {n}")
    if isinstance(header.get("events"), int) and header["events"] != n:
        raise TraceFormatError(p, f"header says {header['events']} events, arrays hold {n}")
    names: list[str] = header["syscalls"]
    codes = cols["sid"]
    if n and (int(codes.min()) < 0 or int(codes.max()) >= len(names)):
        raise TraceFormatError(p, f"'sid' holds codes outside the {len(names)} listed syscalls")
    lut = np.array([_id_of_token(t) for t in names], dtype=np.int64)
    sid = lut.astype(np.int32)[codes] if n else np.empty(0, np.int32)

    meta_raw = header.get("meta")
    extra = {k: v for k, v in arrays.items() if _EXTRA.fullmatch(f"{k}.npy")}
    meta = _decode_meta(meta_raw, extra, p) if isinstance(meta_raw, dict) else {}
    meta["recording"] = {k: header.get(k) for k in ("schema", "arch", "created", "command", "name")}
    label = header.get("label")
    events = SyscallBatch(ts=cols["ts"], pid=cols["pid"], tid=cols["tid"], sid=sid, ret=ret)
    return Trace(
        name=str(p), events=events, label=label if isinstance(label, str) else None, meta=meta
    )


def iter_recordings(path: str | Path) -> Iterator[Trace]:
    """A ``.bamrec`` file, or every ``*.bamrec`` below a folder (sorted)."""
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.rglob(f"*{SUFFIX}")):
            yield read_recording(f)
    else:
        yield read_recording(p)
