"""ADFA-LD reader: tiny hand-written traces, the real training set, and property-based tests."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bam.errors import TraceFormatError
from bam.syscalls import canonical_ids, id_of
from bam.traces import read_traces
from bam.traces.adfa import iter_adfa, read_adfa


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_a_trace_is_i386_numbers_in_one_thread(tmp_path: Path) -> None:
    # 5 = open, 3 = read, 6 = close, 252 = exit_group on i386
    t = read_adfa(write(tmp_path / "x.txt", "5 3 3\n6 252 \n"))
    assert t.events.sid.tolist() == [
        id_of(n) for n in ("open", "read", "read", "close", "exit_group")
    ]
    assert t.events.ts.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # the call index: ADFA has no times
    assert set(t.events.tid.tolist()) == {0}
    assert t.events.ret is None
    assert t.label is None
    assert t.meta == {}


def test_labels_come_from_the_folder(tmp_path: Path) -> None:
    attack = read_adfa(write(tmp_path / "Attack_Data_Master" / "Web_Shell_7" / "UAD-W-1.txt", "3"))
    assert attack.label == "Web_Shell"
    assert attack.meta == {"attack_type": "Web_Shell", "run": 7}
    for folder in ("Training_Data_Master", "Validation_Data_Master"):
        assert read_adfa(write(tmp_path / folder / "U.txt", "3")).label == "normal"
    # a <Type>_<n> folder outside Attack_Data_Master is not an attack
    assert read_adfa(write(tmp_path / "Elsewhere" / "Web_Shell_7" / "U.txt", "3")).label is None


def test_empty_trace_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="empty trace"):
        read_adfa(write(tmp_path / "e.txt", " \n\n"))


def test_a_word_is_an_error_naming_its_line(tmp_path: Path) -> None:
    p = write(tmp_path / "w.txt", "3 4 5\n6 seven 8\n")
    with pytest.raises(
        TraceFormatError, match=r"w\.txt:2: expected a syscall number, found 'seven'"
    ) as e:
        read_adfa(p)
    assert e.value.line == 2


def test_binary_content_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path / "b.txt", b"3 4\n5 \xff\xfe\x00\n")
    with pytest.raises(TraceFormatError, match=r"b\.txt:2: not an ADFA-LD trace: non-ASCII"):
        read_adfa(p)


def test_out_of_range_number_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match=r":3: syscall number 1024 out of range"):
        read_adfa(write(tmp_path / "r.txt", "3\n4\n1024\n"))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="cannot read"):
        read_adfa(tmp_path / "nope.txt")


def test_folders_are_read_sorted_and_through_the_registry(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "3")
    write(tmp_path / "sub" / "a.txt", "4")
    write(tmp_path / "notes.md", "not a trace")
    assert [Path(t.name).name for t in iter_adfa(tmp_path)] == ["b.txt", "a.txt"]
    assert [len(t.events) for t in read_traces("adfa", [tmp_path / "b.txt"])] == [1]
    with pytest.raises(TraceFormatError, match="no such file"):
        list(read_traces("adfa", [tmp_path / "missing"]))


def test_real_training_set(adfa_root: Path) -> None:
    traces = list(iter_adfa(adfa_root / "Training_Data_Master"))
    assert len(traces) == 833
    assert sum(len(t.events) for t in traces) == 308_077  # as SOURCE.md records
    assert {t.label for t in traces} == {"normal"}
    lengths = [len(t.events) for t in traces]
    assert min(lengths) >= 75
    assert max(lengths) <= 4494
    # 150 distinct calls (SOURCE.md), every one a named call of the shared vocabulary
    sids = np.concatenate([t.events.sid for t in traces])
    assert len(np.unique(sids)) == 150
    assert int(sids.max()) < 4096


# --- property-based -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_trace_format_errors(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    p = tmp_path_factory.mktemp("adfa") / "f.txt"
    p.write_bytes(data)
    with contextlib.suppress(TraceFormatError):
        read_adfa(p)


def test_a_huge_number_is_a_format_error_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="out of range"):
        read_adfa(write(tmp_path / "h.txt", "3 99999999999999999999999\n"))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 1023), min_size=1, max_size=200), st.sampled_from([" ", "\n", "  \n"])
)
def test_numbers_round_trip(
    tmp_path_factory: pytest.TempPathFactory, numbers: list[int], sep: str
) -> None:
    p = tmp_path_factory.mktemp("adfa") / "n.txt"
    p.write_text(sep.join(map(str, numbers)))
    t = read_adfa(p)
    assert np.array_equal(t.events.sid, canonical_ids(numbers, "i386"))
