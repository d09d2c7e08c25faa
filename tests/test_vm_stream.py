"""The guest stream decoder on crafted pages: events, losses and bad pages are all counted.

No QEMU needed: pages are built here in the kernel's ring-buffer layout (16-byte page header,
4-byte record headers with 5-bit type_len + 27-bit time delta, 64-byte sys_enter payloads).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from bam.sensors.errors import SensorError
from bam.sensors.vm.stream import PAGE, TRAILER, PageDecoder, parse_header, read_stream
from bam.syscalls import canonical_ids

FORMAT = """name: sys_enter
ID: 346
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;
\tfield:long id;\toffset:8;\tsize:8;\tsigned:1;
\tfield:unsigned long args[6];\toffset:16;\tsize:48;\tsigned:0;
"""


def header(sync: float = 5.0) -> bytes:
    return f"BAMVM 1\nFORMAT {len(FORMAT)}\n{FORMAT}SYNC {sync:.2f}\nPAGES 4096\n".encode()


def page(t0: int, events: list[tuple[int, int, int]], *, missed: bool = False) -> bytes:
    """One ring-buffer page: events are (delta ns, tid, nr)."""
    body = b""
    for delta, tid, nr in events:
        body += struct.pack("<I", 16 | (delta << 5))
        body += struct.pack("<HBBiq6Q", 346, 0, 0, tid, nr, 0, 0, 100, 0, 0, 0)
    commit = len(body) | ((1 << 31) if missed else 0)
    data = struct.pack("<QQ", t0, commit) + body
    return data + b"\0" * (PAGE - len(data))


def trailer(read_events: int, dropped: int = 0) -> bytes:
    text = f"entries: 0\noverrun: 0\ndropped events: {dropped}\nread events: {read_events}\n"
    data = TRAILER + text.encode()
    return data + b"\0" * (PAGE - len(data))


def test_header_parse_and_refusal() -> None:
    h = parse_header(header(7.25) + b"rest")
    assert h is not None
    assert h.sync_uptime == pytest.approx(7.25)
    assert h.fields["id"] == (8, 8)
    assert h.payload == 64
    assert parse_header(header()[:40]) is None  # not complete yet
    with pytest.raises(SensorError, match="BAM header"):
        parse_header(b"GARBAGE\n" * 10)


def test_decoder_events_and_losses() -> None:
    h = parse_header(header())
    assert h is not None
    dec = PageDecoder(h)
    p1 = page(1_000_000, [(0, 1, 59), (10, 1, 257), (10, 2, 1)])
    p2 = page(2_000_000, [(5, 2, 0)], missed=True)
    bad = struct.pack("<QQ", 3_000_000, 9999) + b"\0" * (PAGE - 16)  # commit past the page
    p3 = page(4_000_000, [(1, 3, 60)])
    raw = dec.decode(p1 + p2 + bad + p3)
    assert raw["nr"].tolist() == [59, 257, 1, 0, 60]
    assert raw["tid"].tolist() == [1, 1, 2, 2, 3]
    assert raw["ts"].tolist() == [1_000_000, 1_000_010, 1_000_020, 2_000_005, 4_000_001]
    assert dec.stats.bad_pages == 1
    assert dec.stats.missed >= 1
    assert dec.drops == 2  # one page flagged "missed", one unreadable page
    assert len(dec.stats.drop_ts) == 2
    # the trailer ends the stream and accounts for events that never arrived
    dec.decode(trailer(read_events=7))
    assert dec.ended
    assert dec.drops == 1 + 1 + (7 - 5)


def test_read_stream_file(tmp_path: Path) -> None:
    f = tmp_path / "trace.bin"
    f.write_bytes(
        header(sync=2.0)
        + page(2_000_000_000, [(0, 1, 59), (100, 1, 2), (100, 1, 1)])
        + trailer(read_events=3)
    )
    cap = read_stream(f)
    assert len(cap) == 3
    assert cap.complete
    assert cap.extra["vm"]["ended"]
    assert cap.events.sid.tolist() == canonical_ids([59, 2, 1], "x86_64").tolist()
    # guest-relative seconds when no host anchor is given: the guest's uptime at each event
    assert np.allclose(cap.events.ts, [2.0, 2.0 + 1e-7, 2.0 + 2e-7], atol=1e-9)
    assert cap.events.pid.tolist() == [0, 0, 0]  # tgid unknown inside the guest stream
