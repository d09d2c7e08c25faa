"""LID-DS 2021 reader, on small recordings written here in the dataset's exact layout."""

from __future__ import annotations

import contextlib
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bam.errors import TraceFormatError
from bam.events import Trace
from bam.syscalls import id_of, name_of
from bam.traces import read_traces
from bam.traces.lidds import iter_lidds, parse_sc_lines, read_lidds
from bam.traces.strace import RET_UNKNOWN, UNKNOWN_NAME_BASE

T0 = 1631209047_000000000  # ns

# timestamp_ns user_id process_id process_name thread_id event direction params...
NORMAL_SC = [
    f"{T0 + 100} 33 1573 apache2 1573 epoll_wait < res=1",  # exit without its enter
    f"{T0 + 200} 33 1573 apache2 1573 open > name=/etc/x flags=1(O_RDONLY) mode=0",
    f"{T0 + 300} 33 1573 apache2 1573 open < fd=9(<f>/etc/x) name=/etc/x flags=1(O_RDONLY) mode=0 dev=200024",
    f"{T0 + 400} 33 1573 apache2 1574 read > fd=9(<f>/etc/x) size=4096",
    f"{T0 + 450} 0 1573 apache2 1573 switch > next=1574 pgft_maj=0 pgft_min=0 vm_size=0",
    f"{T0 + 500} 33 1573 apache2 1574 read < res=-11(EAGAIN) data=",
    f"{T0 + 600} 33 1573 apache2 1573 pread > fd=9(<f>/etc/x) size=10 pos=0",
    f"{T0 + 700} 33 1573 apache2 1573 pread < res=10 data=0123456789",
    f"{T0 + 800} 33 1580 Web Content 1581 close > fd=9(<f>/etc/x)",
    f"{T0 + 900} 33 1580 Web Content 1581 close < res=0",
    f"{T0 + 950} 33 1573 apache2 1573 futex > addr=7F0 op=129(FUTEX_PRIVATE_FLAG|FUTEX_WAKE) val=1",
]

META_ATTACK: dict[str, Any] = {
    "container": [
        {"ip": "192.168.192.7", "name": "9c2d6a755da7b298", "role": "attacker"},
        {"ip": "192.168.192.8", "name": "4450e431d781b609", "role": "victim"},
    ],
    "exploit": True,
    "exploit_name": "CVE-2017-7529",
    "image": "victim_overflow",
    "recording_time": 45,
    "time": {
        "container_ready": {"absolute": 1631209040.2, "relative": -3.0, "source": "CONTROL_SCRIPT"},
        "exploit": [
            {"absolute": 1631209047.5, "name": "attack", "relative": 13.4, "source": "TCPDUMP"}
        ],
        "warmup_end": {"absolute": 1631209043.2, "relative": 0, "source": "CONTROL_SCRIPT"},
    },
}
META_NORMAL = {**META_ATTACK, "exploit": False, "time": {**META_ATTACK["time"], "exploit": []}}
RES = (
    "timestamp,cpu_usage,memory_usage,network_received,network_send,storage_read,storage_written\n"
    "1631209043.247,0.0,2830336,1607,0,NULL,0\n"
    "1631209044.253,0.13,2924544,44314,4895506,NULL,0\n"
)


def recording(
    folder: Path,
    name: str,
    sc: list[str] | str | bytes | None = None,
    meta: dict[str, Any] | str | None = None,
    res: str | None = RES,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A LID-DS 2021 recording: ``<name>.zip`` holding ``<name>.sc/.json/.res``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        if sc is not None:
            data = sc if isinstance(sc, str | bytes) else "\n".join(sc) + "\n"
            z.writestr(f"{name}.sc", data)
        if meta is not None:
            z.writestr(
                f"{name}.json", meta if isinstance(meta, str) else json.dumps(meta, indent=4)
            )
        if res is not None:
            z.writestr(f"{name}.res", res)
        for member, blob in (extra or {}).items():
            z.writestr(member, blob)
    return path


def names(t: Trace) -> list[str]:
    return [name_of(int(s)) for s in t.events.sid]


def test_normal_recording(tmp_path: Path) -> None:
    t = read_lidds(recording(tmp_path, "acidic_bhaskara_7006", NORMAL_SC, META_NORMAL))
    assert t.label == "normal"
    assert names(t) == ["open", "read", "pread64", "close", "futex"]
    assert t.events.ret is not None
    assert t.events.ret.tolist() == [9, -11, 10, 0, RET_UNKNOWN]
    assert t.events.tid.tolist() == [1573, 1574, 1573, 1581, 1573]
    assert t.events.pid.tolist() == [1573, 1573, 1573, 1580, 1573]
    np.testing.assert_allclose(
        t.events.ts - 1631209047.0, [2e-7, 4e-7, 6e-7, 8e-7, 9.5e-7], atol=1e-6
    )
    assert t.meta["skipped_events"] == {"switch": 1}
    assert t.meta["orphan_exits"] == 1
    assert t.meta["exploit_time"] is None
    assert t.meta["warmup_end"] == pytest.approx(1631209043.2)
    assert t.meta["lidds_recording"] == "acidic_bhaskara_7006"
    assert t.meta["unknown_names"] == {}


def test_attack_recording_has_label_and_exploit_time(tmp_path: Path) -> None:
    t = read_lidds(recording(tmp_path, "rec", NORMAL_SC, META_ATTACK))
    assert t.label == "attack"
    assert t.meta["exploit_time"] == pytest.approx(1631209047.5)
    assert t.meta["exploit_names"] == ["attack"]
    assert t.meta["exploit_name"] == "CVE-2017-7529"
    assert [c["role"] for c in t.meta["containers"]] == ["attacker", "victim"]
    # exploit time and event timestamps share a clock, so "events after the attack" is a mask
    assert np.all(t.events.ts < t.meta["exploit_time"])


def test_resources_are_parsed_into_arrays(tmp_path: Path) -> None:
    r = read_lidds(recording(tmp_path, "rec", NORMAL_SC, META_NORMAL)).meta["resources"]
    assert list(r) == [
        "timestamp",
        "cpu_usage",
        "memory_usage",
        "network_received",
        "network_send",
        "storage_read",
        "storage_written",
    ]
    assert r["memory_usage"].tolist() == [2830336.0, 2924544.0]
    assert all(v.dtype == np.float64 for v in r.values())
    assert np.isnan(r["storage_read"]).all()  # NULL


@pytest.mark.parametrize(
    ("res", "note"),
    [
        ("timestamp,cpu\n1,2,3\n", "fields"),
        ("timestamp,cpu\n1,abc\n", "abc"),
        (None, "no rec.res"),
    ],
)
def test_unparseable_resources_are_noted_not_fatal(
    tmp_path: Path, res: str | None, note: str
) -> None:
    t = read_lidds(recording(tmp_path, "rec", NORMAL_SC, META_NORMAL, res=res))
    assert "resources" not in t.meta
    assert note in t.meta["resources_note"]


def test_results_that_are_not_decimal_numbers_stay_unknown(tmp_path: Path) -> None:
    sc = [
        f"{T0} 0 5 sh 5 mmap > addr=0 length=4096 prot=3 flags=10 fd=-1 offset=0",
        f"{T0 + 1} 0 5 sh 5 mmap < res=7F29B7C56000 vm_size=2000 vm_rss=100 vm_swap=0",
        f"{T0 + 2} 0 5 sh 5 getcwd > ",
        f"{T0 + 3} 0 5 sh 5 getcwd < res=<NA>",
        f"{T0 + 4} 0 5 sh 5 close > fd=3",
        f"{T0 + 5} 0 5 sh 5 close <",
    ]
    t = read_lidds(recording(tmp_path, "rec", sc, META_NORMAL))
    assert names(t) == ["mmap", "getcwd", "close"]
    assert t.events.ret is not None
    assert t.events.ret.tolist() == [RET_UNKNOWN] * 3


def test_direction_before_name_is_accepted_too(tmp_path: Path) -> None:
    sc = [f"{T0} 0 5 sh 5 > execve filename=/bin/sh", f"{T0 + 1} 0 5 sh 5 < execve res=0"]
    t = read_lidds(recording(tmp_path, "rec", sc, META_NORMAL))
    assert names(t) == ["execve"]
    assert t.events.ret is not None
    assert t.events.ret.tolist() == [0]


def test_unknown_event_names_get_fallback_ids(tmp_path: Path) -> None:
    sc = [f"{T0} 0 5 sh 5 newcall > x=1", f"{T0 + 1} 0 5 sh 5 newcall < res=0"]
    t = read_lidds(recording(tmp_path, "rec", sc, META_NORMAL))
    assert int(t.events.sid[0]) >= UNKNOWN_NAME_BASE
    assert t.meta["unknown_names"] == {"newcall": int(t.events.sid[0])}


def test_single_quoted_json_is_accepted(tmp_path: Path) -> None:
    js = json.dumps(META_ATTACK).replace('"', "'")
    assert read_lidds(recording(tmp_path, "rec", NORMAL_SC, js)).label == "attack"


def test_missing_json_gives_no_label(tmp_path: Path) -> None:
    t = read_lidds(recording(tmp_path, "rec", NORMAL_SC, None))
    assert t.label is None
    assert "no rec.json" in t.meta["label_note"]


# --- malformed recordings -----------------------------------------------------------------------


def test_missing_sc_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match=r"rec\.zip: not a LID-DS recording: no rec\.sc"):
        read_lidds(recording(tmp_path, "rec", None, META_NORMAL))


def test_bad_json_is_an_error_naming_member_and_line(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match=r"rec\.zip\[rec\.json\]:3: bad JSON") as e:
        read_lidds(recording(tmp_path, "rec", NORMAL_SC, '{\n  "exploit": true,\n  oops\n}'))
    assert e.value.line == 3


@pytest.mark.parametrize("meta", ['"just a string"', '{"exploit": "yes"}', "[1, 2]"])
def test_wrong_json_shapes_are_errors(tmp_path: Path, meta: str) -> None:
    with pytest.raises(TraceFormatError, match=r"rec\.json\]"):
        read_lidds(recording(tmp_path, "rec", NORMAL_SC, meta))


def test_garbage_line_is_an_error_naming_member_and_line(tmp_path: Path) -> None:
    sc = [*NORMAL_SC[:3], "this is not sysdig output", *NORMAL_SC[3:]]
    with pytest.raises(
        TraceFormatError, match=r"rec\.zip\[rec\.sc\]:4: not a LID-DS syscall line"
    ) as e:
        read_lidds(recording(tmp_path, "rec", sc, META_NORMAL))
    assert e.value.line == 4


def test_binary_sc_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="binary content"):
        read_lidds(recording(tmp_path, "rec", b"\x00\x01\x02\xff\xfe\n", META_NORMAL))


def test_empty_sc_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="no system calls"):
        read_lidds(recording(tmp_path, "rec", "", META_NORMAL))


def test_not_a_zip_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "rec.zip"
    p.write_text("hello")
    with pytest.raises(TraceFormatError, match="not a zip file"):
        read_lidds(p)


def _corrupt_member_data(path: Path, member: str) -> None:
    """Flip bytes inside ``member``'s compressed data (the zip structure stays valid)."""
    data = bytearray(path.read_bytes())
    start = data.find(b"PK\x03\x04")  # the first local header
    while start >= 0:
        name_len, extra_len = struct.unpack_from("<HH", data, start + 26)
        if data[start + 30 : start + 30 + name_len].decode() == member:
            body = start + 30 + name_len + extra_len
            for i in range(body + 5, body + 40):
                data[i] ^= 0x5A
            path.write_bytes(bytes(data))
            return
        start = data.find(b"PK\x03\x04", start + 4)
    raise AssertionError(f"{member} not found")


def test_corrupt_compressed_data_is_an_error(tmp_path: Path) -> None:
    p = recording(tmp_path, "rec", NORMAL_SC * 50, META_NORMAL)
    _corrupt_member_data(p, "rec.sc")
    with pytest.raises(TraceFormatError, match=r"rec\.zip: corrupt zip"):
        read_lidds(p)


def _declare_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size a zip's central directory declares for ``member``."""
    data = bytearray(path.read_bytes())
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46 : pos + 46 + name_len].decode() == member:
            struct.pack_into("<I", data, pos + 24, size)
            path.write_bytes(bytes(data))
            return
        pos += 4
    raise AssertionError(f"{member} not in central directory")


def test_zip_bomb_sized_members_are_refused_before_reading(tmp_path: Path) -> None:
    p = recording(tmp_path, "rec", NORMAL_SC, META_NORMAL)
    _declare_size(p, "rec.sc", 0xFFFFFFF0)
    with pytest.raises(TraceFormatError, match=r"rec\.sc\]: declares 4294967280 bytes"):
        read_lidds(p, max_sc_bytes=1 << 30)
    # and a limit is a limit, whatever the header says
    ok = recording(tmp_path / "b", "rec", NORMAL_SC, META_NORMAL)
    with pytest.raises(TraceFormatError, match="above the 100-byte limit"):
        read_lidds(ok, max_sc_bytes=100)


def test_oversized_json_is_refused(tmp_path: Path) -> None:
    p = recording(tmp_path, "rec", NORMAL_SC, META_NORMAL)
    _declare_size(p, "rec.json", 1 << 30)
    with pytest.raises(TraceFormatError, match=r"rec\.json\]: declares"):
        read_lidds(p)


def test_hostile_member_names_are_never_extracted(tmp_path: Path) -> None:
    inner = tmp_path / "in"
    p = recording(
        inner,
        "rec",
        None,
        META_NORMAL,
        extra={"../../evil.sc": ("\n".join(NORMAL_SC) + "\n").encode(), "/abs/evil.res": b"x"},
    )
    before = sorted(x.name for x in tmp_path.rglob("*"))
    t = read_lidds(p)  # the only .sc member is used, read in memory
    assert names(t)[0] == "open"
    assert sorted(x.name for x in tmp_path.rglob("*")) == before


def test_folders_are_read_in_order_with_their_split(tmp_path: Path) -> None:
    root = tmp_path / "CVE-2017-7529"
    recording(root / "training", "b_rec", NORMAL_SC, META_NORMAL)
    recording(root / "training", "a_rec", NORMAL_SC, META_NORMAL)
    recording(root / "test" / "normal_and_attack", "c_rec", NORMAL_SC, META_ATTACK)
    traces = list(iter_lidds(root))
    assert [Path(t.name).name for t in traces] == ["c_rec.zip", "a_rec.zip", "b_rec.zip"]
    assert [t.meta.get("split") for t in traces] == [
        "test/normal_and_attack",
        "training",
        "training",
    ]
    assert [t.label for t in list(read_traces("lidds", [root / "test"]))] == ["attack"]


# --- the line parser, property-based ------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=100), max_size=10))
def test_arbitrary_bytes_lines_raise_only_trace_format_errors(lines: list[bytes]) -> None:
    with contextlib.suppress(TraceFormatError):
        parse_sc_lines(lines, "fuzz")


_SC_NAMES = st.sampled_from(["open", "read", "write", "close", "epoll_wait", "futex", "execve"])


@st.composite
def _event(draw: st.DrawFn) -> tuple[int, int, str, int, str, int]:
    ts = draw(st.integers(0, 2**62))
    tid = draw(st.integers(1, 2**31 - 1))
    comm = draw(
        st.text(alphabet="abcdefgh -_/.", min_size=1, max_size=15).map(str.strip).filter(bool)
    )
    pid = draw(st.integers(1, 2**31 - 1))
    name = draw(_SC_NAMES)
    ret = draw(st.integers(-(2**63) + 1, 2**63 - 1))
    return ts, tid, comm, pid, name, ret


@settings(max_examples=200, deadline=None)
@given(st.lists(_event(), min_size=1, max_size=10))
def test_generated_sc_lines_round_trip(events: list[tuple[int, int, str, int, str, int]]) -> None:
    lines = []
    for ts, tid, comm, pid, name, ret in events:
        lines.append(f"{ts} 0 {pid} {comm} {tid} {name} > fd=3".encode())
        lines.append(f"{ts + 1} 0 {pid} {comm} {tid} {name} < res={ret}(EX) data=x".encode())
    batch, notes = parse_sc_lines(lines, "gen")
    assert batch.sid.tolist() == [id_of(e[4]) for e in events]
    assert batch.tid.tolist() == [e[1] for e in events]
    assert batch.pid.tolist() == [e[3] for e in events]
    assert batch.ret is not None
    assert batch.ret.tolist() == [e[5] for e in events]
    assert batch.ts.tolist() == [e[0] / 1e9 for e in events]
    assert notes["lines"] == 2 * len(events)
