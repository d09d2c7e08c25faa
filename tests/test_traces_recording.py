"""BAM's own recording format: exact round trips, atomic writes, and every kind of bad file."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npformat
import pytest

from bam.errors import TraceFormatError
from bam.events import SyscallBatch, Trace
from bam.syscalls import canonical_ids, id_of
from bam.traces import read_traces
from bam.traces.recording import iter_recordings, read_recording, write_recording
from bam.traces.strace import RET_UNKNOWN, UNKNOWN_NAME_BASE, hashed_id


def sample_trace(n: int = 1000, *, ret: bool = True) -> Trace:
    rng = np.random.default_rng(7)
    vocab = np.array(
        [
            id_of("read"),
            id_of("write"),
            id_of("openat"),
            id_of("_llseek"),  # an i386-only name
            int(canonical_ids([451], "x86_64")[0]),  # unnamed number
            hashed_id("frobnicate"),  # hashed unknown name
        ],
        dtype=np.int32,
    )
    ts = 1.7e9 + np.cumsum(rng.random(n))
    ts[n // 2] = np.nan
    ev = SyscallBatch(
        ts=ts,
        pid=rng.integers(1, 2**31 - 1, n).astype(np.int32),
        tid=rng.integers(1, 2**31 - 1, n).astype(np.int32),
        sid=vocab[rng.integers(0, len(vocab), n)],
        ret=np.concatenate([[RET_UNKNOWN, 2**63 - 1], rng.integers(-4096, 2**40, n - 2)]).astype(
            np.int64
        )
        if ret
        else None,
    )
    meta = {
        "format": "strace",
        "args": {"execve": [(3, "/bin/sh")]},
        "signals": [(float("nan"), 5, "SIGCHLD")],
        "resources": {"cpu": np.array([0.5, np.nan]), "mem": np.arange(3, dtype=np.int64)},
        "unicode": "été \udcff",
        "nested": {"big": 2**70, "none": None, "flag": True, "inf": float("-inf")},
    }
    return Trace(name="orig.log", events=ev, label="normal", meta=meta)


def same_bits(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    t = sample_trace()
    p = write_recording(tmp_path / "r.bamrec", t, command=["python", "x.py"])
    back = read_recording(p)
    for k in ("ts", "pid", "tid", "sid", "ret"):
        assert same_bits(getattr(t.events, k), getattr(back.events, k)), k
    assert back.label == "normal"
    assert back.name == str(p)
    m = back.meta
    assert m["args"] == {"execve": [[3, "/bin/sh"]]}  # tuples come back as lists (JSON)
    assert np.isnan(m["signals"][0][0])
    assert same_bits(m["resources"]["cpu"], t.meta["resources"]["cpu"])
    assert same_bits(m["resources"]["mem"], t.meta["resources"]["mem"])
    assert m["unicode"] == "été \udcff"
    assert m["nested"] == {"big": 2**70, "none": None, "flag": True, "inf": float("-inf")}
    assert m["recording"]["schema"] == 1
    assert m["recording"]["arch"] == "x86_64"
    assert m["recording"]["command"] == ["python", "x.py"]
    assert m["recording"]["name"] == "orig.log"

    # writing what was read gives the same arrays again
    again = read_recording(write_recording(tmp_path / "r2.bamrec", back))
    for k in ("ts", "pid", "tid", "sid", "ret"):
        assert same_bits(getattr(back.events, k), getattr(again.events, k)), k
    assert again.meta["recording"]["command"] == ["python", "x.py"]


def test_without_return_values_and_empty(tmp_path: Path) -> None:
    back = read_recording(write_recording(tmp_path / "a.bamrec", sample_trace(10, ret=False)))
    assert back.events.ret is None
    empty = Trace("e", SyscallBatch.from_ids(np.empty(0, np.int32)), None, {})
    back = read_recording(write_recording(tmp_path / "e.bamrec", empty))
    assert len(back.events) == 0
    assert back.label is None


def test_syscalls_are_stored_by_name(tmp_path: Path) -> None:
    """Names survive a change of BAM's syscall vocabulary; canonical ids would not."""
    p = write_recording(tmp_path / "r.bamrec", sample_trace(50))
    with zipfile.ZipFile(p) as z:
        header = json.loads(np.load(io.BytesIO(z.read("meta.npy"))).tobytes())
    assert header["format"] == "bam-recording"
    assert header["schema"] == 1
    assert set(header["syscalls"]) == {
        "read",
        "write",
        "openat",
        "_llseek",
        "x86_64#451",
        f"#{hashed_id('frobnicate')}",
    }
    assert hashed_id("frobnicate") >= UNKNOWN_NAME_BASE


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "r.bamrec"
    write_recording(p, sample_trace(20))
    before = p.read_bytes()

    bad = sample_trace(20)
    bad.meta = {"oops": object()}
    with pytest.raises(ValueError, match=r"meta\.oops: object cannot be stored"):
        write_recording(p, bad)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(OSError, match="disk full"):
        write_recording(p, sample_trace(30))
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.bamrec"]  # no temp file left


def test_folders_and_registry(tmp_path: Path) -> None:
    write_recording(tmp_path / "b.bamrec", sample_trace(5))
    (tmp_path / "sub").mkdir()
    write_recording(tmp_path / "sub" / "a.bamrec", sample_trace(6))
    (tmp_path / "notes.txt").write_text("not a recording")
    assert [len(t.events) for t in iter_recordings(tmp_path)] == [5, 6]
    assert [len(t.events) for t in read_traces("bam", [tmp_path / "b.bamrec"])] == [5]


# --- bad files ----------------------------------------------------------------------------------


def _npz(path: Path, members: dict[str, bytes | np.ndarray[Any, Any]]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, value in members.items():
            if isinstance(value, np.ndarray):
                buf = io.BytesIO()
                np.save(buf, value, allow_pickle=True)
                value = buf.getvalue()
            z.writestr(name if name.endswith(".npy") else f"{name}.npy", value)
    return path


def _header(**over: Any) -> np.ndarray[Any, Any]:
    h = {"format": "bam-recording", "schema": 1, "syscalls": ["read", "write"], "meta": {}}
    h.update(over)
    return np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)


def _arrays(n: int = 3, **over: Any) -> dict[str, Any]:
    a: dict[str, Any] = {
        "meta": _header(),
        "ts": np.arange(n, dtype=np.float64),
        "pid": np.ones(n, np.int32),
        "tid": np.ones(n, np.int32),
        "sid": np.zeros(n, np.int32),
    }
    a.update(over)
    return {k: v for k, v in a.items() if v is not None}


def test_a_hand_made_valid_file_reads(tmp_path: Path) -> None:
    t = read_recording(_npz(tmp_path / "ok.bamrec", _arrays()))
    assert t.events.sid.tolist() == [id_of("read")] * 3


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (_arrays(pid=None), "missing array 'pid'"),
        (_arrays(pid=np.ones(3, np.int64)), "array 'pid' has dtype int64, expected int32"),
        (_arrays(ts=np.ones(3, np.float32)), "array 'ts' has dtype float32, expected float64"),
        (_arrays(tid=np.ones((3, 1), np.int32)), r"array 'tid' has shape \(3, 1\), expected 1-D"),
        (_arrays(tid=np.ones(4, np.int32)), "array 'tid' has 4 rows, 'sid' has 3"),
        (_arrays(ret=np.ones(2, np.int64)), "array 'ret' has 2 rows, 'sid' has 3"),
        (_arrays(sid=np.array([0, 1, 2], np.int32)), "codes outside the 2 listed syscalls"),
        (_arrays(meta=_header(schema=2)), r"schema 2 is newer than this BAM supports \(1\)"),
        (_arrays(meta=_header(schema="1")), "invalid schema version"),
        (_arrays(meta=_header(format="something-else")), "format tag is 'something-else'"),
        (_arrays(meta=_header(syscalls="read")), '"syscalls" must be a list'),
        (_arrays(meta=_header(events=7)), "header says 7 events, arrays hold 3"),
        (_arrays(meta=_header(meta={"x": {"__ndarray__": "m9"}})), "missing array 'm9'"),
        (_arrays(meta=np.frombuffer(b"{not json", np.uint8)), "header is not valid JSON"),
        (_arrays(meta=np.array([1.0])), "header is not UTF-8 bytes"),
        ({"ts": np.zeros(1)}, r"no header \(array 'meta'\)"),
        (_arrays(pid=np.array([object()] * 3, dtype=object)), "holds Python objects; refused"),
    ],
)
def test_bad_recordings_get_clear_errors(
    tmp_path: Path, members: dict[str, Any], message: str
) -> None:
    p = _npz(tmp_path / "bad.bamrec", members)
    with pytest.raises(TraceFormatError, match=message) as e:
        read_recording(p)
    assert e.value.path == str(p)


def test_not_a_zip(tmp_path: Path) -> None:
    p = tmp_path / "x.bamrec"
    p.write_text("hello, I am text")
    with pytest.raises(TraceFormatError, match="not a zip/npz file"):
        read_recording(p)
    with pytest.raises(TraceFormatError, match="cannot read"):
        read_recording(tmp_path / "missing.bamrec")


def test_a_plain_npy_file_is_not_a_recording(tmp_path: Path) -> None:
    p = tmp_path / "x.bamrec"
    np.save(p.open("wb"), np.arange(3))
    with pytest.raises(TraceFormatError, match="not a zip/npz file"):
        read_recording(p)


def test_truncated_file(tmp_path: Path) -> None:
    p = write_recording(tmp_path / "r.bamrec", sample_trace(200))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceFormatError, match=r"r\.bamrec"):
        read_recording(p)


def test_corrupt_compressed_data(tmp_path: Path) -> None:
    p = write_recording(tmp_path / "r.bamrec", sample_trace(2000))
    data = bytearray(p.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, 26)  # the first member
    body = 30 + name_len + extra_len
    for i in range(body + 5, body + 40):
        data[i] ^= 0x5A
    p.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match=r"r\.bamrec: corrupt recording"):
        read_recording(p)


def test_header_claiming_a_huge_shape_is_refused_without_allocating(tmp_path: Path) -> None:
    buf = io.BytesIO()
    npformat.write_array_header_1_0(
        buf, {"descr": "<i4", "fortran_order": False, "shape": (10**13,)}
    )
    buf.write(b"\x00" * 12)
    p = _npz(tmp_path / "huge.bamrec", {**_arrays(pid=None), "pid.npy": buf.getvalue()})
    with pytest.raises(
        TraceFormatError, match=r"array 'pid': header claims shape \(10000000000000,\)"
    ):
        read_recording(p)


def test_duplicate_members_are_refused(tmp_path: Path) -> None:
    p = _npz(tmp_path / "dup.bamrec", _arrays())
    with zipfile.ZipFile(p, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("pid.npy", b"")
    with pytest.raises(TraceFormatError, match=r"duplicate member 'pid\.npy'"):
        read_recording(p)


def test_declared_sizes_are_bounded(tmp_path: Path) -> None:
    p = write_recording(tmp_path / "r.bamrec", sample_trace(100))
    with pytest.raises(TraceFormatError, match="above the 1000-byte limit"):
        read_recording(p, max_bytes=1000)


def test_bad_meta_values_are_refused_on_write(tmp_path: Path) -> None:
    t = sample_trace(3)
    cases: list[tuple[dict[Any, Any], str]] = [
        ({1: "x"}, "keys must be strings"),
        ({"a": np.array(["s"])}, "cannot be stored"),
        ({"__ndarray__": 1}, "is reserved"),
    ]
    for meta, msg in cases:
        t.meta = meta
        with pytest.raises(ValueError, match=msg):
            write_recording(tmp_path / "x.bamrec", t)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown architecture"):
        write_recording(tmp_path / "x.bamrec", sample_trace(3), arch="arm64")  # type: ignore[arg-type]


def test_a_lidds_trace_survives_a_recording_round_trip(tmp_path: Path) -> None:
    import test_traces_lidds as lid

    t = read_traces("lidds", [lid.recording(tmp_path, "rec", lid.NORMAL_SC, lid.META_ATTACK)])
    orig = next(iter(t))
    back = read_recording(write_recording(tmp_path / "rec.bamrec", orig))
    assert back.label == "attack"
    assert back.meta["lidds_recording"] == "rec"
    assert back.meta["exploit_time"] == orig.meta["exploit_time"]
    for k, v in orig.meta["resources"].items():
        assert same_bits(back.meta["resources"][k], v)
    for k in ("ts", "pid", "tid", "sid", "ret"):
        assert same_bits(getattr(orig.events, k), getattr(back.events, k)), k
