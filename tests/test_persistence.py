"""Safe persistence: saved models reload bit-identically, and anything else is refused.

Models and baselines are JSON metadata + numeric arrays in one ``.npz``; the sha256 ``model_id``
covers both. These tests save every detector and a fitted Baseline, reload them, and then attack
the files: edited arrays, edited metadata, foreign, truncated and corrupted files, and npz files
that carry pickles (which must be refused without ever being unpickled).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from bam.detect import Baseline
from bam.errors import ModelError, ModelIntegrityError
from bam.events import SyscallBatch, Trace
from bam.models import DETECTORS, CallDetector, Detector, NgramLM, Stide
from bam.models.persistence import compute_model_id, load_artifact, save_artifact
from bam.traces.strace import parse_strace
from test_models import HELD_OUT, TRAIN, UNSEEN_PHRASE, inject, normal_seqs, small

META = "__bam_meta__"


@pytest.fixture(scope="module")
def fitted() -> dict[str, Detector]:
    return {name: small(name).fit(TRAIN[:25]) for name in DETECTORS}


def trace(seq: npt.NDArray[np.int32], name: str = "t") -> Trace:
    return Trace(name, SyscallBatch.from_ids(seq, 100.0 + np.arange(len(seq)) * 0.01))


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    return Baseline(NgramLM(), window=50).fit([trace(s) for s in normal_seqs(7, 12, 500)])


PROBES = [*HELD_OUT[:6], inject(HELD_OUT[6], UNSEEN_PHRASE, 40, repeat=2)]


# --- npz surgery helpers --------------------------------------------------------------------------


def read_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_members(path: Path, members: dict[str, bytes]) -> None:
    """Rewrite an npz with valid zip structure and CRCs (a careful attacker, not bit rot)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, b in members.items():
            z.writestr(n, b)


def npy_bytes(a: npt.NDArray[Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def load_npy(b: bytes) -> npt.NDArray[Any]:
    return np.load(io.BytesIO(b), allow_pickle=False)  # type: ignore[no-any-return]


def header(members: dict[str, bytes]) -> dict[str, Any]:
    h: dict[str, Any] = json.loads(load_npy(members[f"{META}.npy"]).tobytes())
    return h


def set_header(members: dict[str, bytes], h: dict[str, Any]) -> None:
    raw = json.dumps(h, sort_keys=True, separators=(",", ":")).encode()
    members[f"{META}.npy"] = npy_bytes(np.frombuffer(raw, dtype=np.uint8))


def rehash(members: dict[str, bytes]) -> str:
    """Recompute the recorded model_id after an edit (an attacker who knows the scheme)."""
    h = header(members)
    h.pop("model_id")
    arrays = {n[: -len(".npy")]: load_npy(b) for n, b in members.items() if n != f"{META}.npy"}
    mid = compute_model_id(h, arrays)
    h["model_id"] = mid
    set_header(members, h)
    return mid


# --- bit-identical reload -------------------------------------------------------------------------


@pytest.mark.parametrize("name", DETECTORS)
def test_every_detector_reloads_bit_identically(
    fitted: dict[str, Detector], name: str, tmp_path: Path
) -> None:
    det = fitted[name]
    path = tmp_path / f"{name}.npz"
    mid = det.save(path)
    assert mid.startswith("sha256:")
    assert len(mid) == len("sha256:") + 64
    loaded = Detector.load(path)
    assert type(loaded) is type(det)
    assert loaded.get_params() == det.get_params()
    meta0, arrays0 = det.state()
    meta1, arrays1 = loaded.state()
    assert meta1 == meta0
    assert sorted(arrays1) == sorted(arrays0)
    for k in arrays0:
        assert arrays1[k].dtype == arrays0[k].dtype, k
        np.testing.assert_array_equal(arrays1[k], arrays0[k], err_msg=k)
    assert load_artifact(path)[2] == mid
    # same scores, to the bit, and the same explanations
    np.testing.assert_array_equal(loaded.score(PROBES), det.score(PROBES))
    if isinstance(det, CallDetector):
        assert isinstance(loaded, CallDetector)
        for a, b in zip(loaded.call_scores(PROBES), det.call_scores(PROBES), strict=True):
            np.testing.assert_array_equal(a, b)
    assert loaded.explain(PROBES[-1]) == det.explain(PROBES[-1])
    # saving the reloaded model gives the same id: the id is of the content, not the file
    assert loaded.save(tmp_path / "again.npz") == mid
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_model_id_is_independent_of_array_order_and_detects_any_change() -> None:
    a = {"x": np.arange(5.0), "y": np.array([1, 2], dtype=np.int64)}
    b = {"y": a["y"], "x": a["x"]}
    assert compute_model_id({"k": 1}, a) == compute_model_id({"k": 1}, b)
    changed = {"x": a["x"].copy(), "y": a["y"]}
    changed["x"][2] = np.nextafter(changed["x"][2], 10)
    assert compute_model_id({"k": 1}, changed) != compute_model_id({"k": 1}, a)
    assert compute_model_id({"k": 2}, a) != compute_model_id({"k": 1}, a)
    retyped = {"x": a["x"].astype(np.float32), "y": a["y"]}
    assert compute_model_id({"k": 1}, retyped) != compute_model_id({"k": 1}, a)


def test_baseline_reloads_bit_identically(baseline: Baseline, tmp_path: Path) -> None:
    path = tmp_path / "baseline.npz"
    mid = baseline.save(path)
    loaded = Baseline.load(path, expect_model_id=mid)
    assert loaded.model_id_ == baseline.model_id_ == mid
    assert loaded.thresholds() == baseline.thresholds()
    assert (loaded.window, loaded.target_far, loaded.holdout, loaded.seed) == (
        baseline.window,
        baseline.target_far,
        baseline.holdout,
        baseline.seed,
    )
    traces = [trace(s, f"p{i}") for i, s in enumerate(PROBES)]
    for t in traces:
        assert loaded.score_trace(t).as_dict() == baseline.score_trace(t).as_dict()
    seqs = [t.sequences() for t in traces]
    np.testing.assert_array_equal(loaded.trace_scores(seqs), baseline.trace_scores(seqs))
    assert loaded.save(tmp_path / "again.npz") == mid


# --- integrity: ids, tampering --------------------------------------------------------------------


def test_expect_model_id_pins_the_artefact(baseline: Baseline, tmp_path: Path) -> None:
    path = tmp_path / "b.npz"
    mid = baseline.save(path)
    other = "sha256:" + "0" * 64
    with pytest.raises(ModelIntegrityError) as e:
        Baseline.load(path, expect_model_id=other)
    msg = str(e.value)
    assert str(path) in msg
    assert mid in msg
    assert other in msg
    assert "expected" in msg
    with pytest.raises(ModelIntegrityError, match="expected"):
        Detector.load(_save_detector(tmp_path), expect_model_id=other)


def _save_detector(tmp_path: Path) -> Path:
    p = tmp_path / "stide.npz"
    Stide().fit(TRAIN[:5]).save(p)
    return p


@pytest.mark.parametrize("target", ["baseline", "detector"])
def test_one_changed_byte_in_an_array_is_refused(
    baseline: Baseline, target: str, tmp_path: Path
) -> None:
    path = tmp_path / "m.npz"
    if target == "baseline":
        baseline.save(path)
    else:
        NgramLM().fit(TRAIN[:5]).save(path)
    members = read_members(path)
    name = next(n for n in sorted(members) if n.startswith("logp") or n.startswith("keys"))
    raw = bytearray(members[name])
    raw[-3] ^= 0x01  # one bit of one value, far from the npy header
    members[name] = bytes(raw)
    write_members(path, members)
    with pytest.raises(ModelIntegrityError, match="does not match its recorded model_id"):
        (Baseline.load if target == "baseline" else Detector.load)(path)


def test_edited_metadata_is_refused(baseline: Baseline, tmp_path: Path) -> None:
    path = tmp_path / "b.npz"
    baseline.save(path)
    members = read_members(path)
    h = header(members)
    h["meta"]["thresholds"]["trace"] = 1e9  # an attacker silencing every alarm
    set_header(members, h)
    write_members(path, members)
    with pytest.raises(ModelIntegrityError, match="file altered"):
        Baseline.load(path)


def test_a_self_consistent_forgery_is_caught_by_the_pinned_id(
    baseline: Baseline, tmp_path: Path
) -> None:
    """The model_id is a digest, not a signature: whoever rewrites the file can rewrite the id.
    What stops a forgery is pinning the known-good id (evidence carries it)."""
    path = tmp_path / "b.npz"
    good = baseline.save(path)
    members = read_members(path)
    h = header(members)
    h["meta"]["thresholds"]["trace"] = 1e9
    set_header(members, h)
    forged = rehash(members)
    write_members(path, members)
    assert forged != good
    assert Baseline.load(path).trace_threshold_ == 1e9  # self-consistent: loads
    with pytest.raises(ModelIntegrityError, match="not the expected"):
        Baseline.load(path, expect_model_id=good)


# --- foreign, truncated, corrupted, hostile files -------------------------------------------------


def test_foreign_files_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.arange(3))
    with pytest.raises(ModelError, match="not a BAM model"):
        Detector.load(plain)
    text = tmp_path / "model.npz"
    text.write_text("hello\n")
    with pytest.raises(ModelError, match="not a readable BAM model"):
        Detector.load(text)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match=str(empty)):
        Detector.load(empty)
    with pytest.raises(ModelError, match="cannot read"):
        Detector.load(tmp_path / "missing.npz")
    with pytest.raises(ModelError, match=str(tmp_path)):
        Detector.load(tmp_path)
    bad_json = tmp_path / "badjson.npz"
    write_members(bad_json, {f"{META}.npy": npy_bytes(np.frombuffer(b"{not", dtype=np.uint8))})
    with pytest.raises(ModelError, match="not valid JSON"):
        Detector.load(bad_json)
    wrong_tag = tmp_path / "tag.npz"
    tag = np.frombuffer(b'{"format": "other"}', dtype=np.uint8)
    write_members(wrong_tag, {f"{META}.npy": npy_bytes(tag)})
    with pytest.raises(ModelError, match="format tag"):
        Detector.load(wrong_tag)


def test_newer_schema_and_wrong_kind_are_refused(baseline: Baseline, tmp_path: Path) -> None:
    path = tmp_path / "b.npz"
    baseline.save(path)
    with pytest.raises(ModelError, match="expected a 'detector'"):
        Detector.load(path)
    det = _save_detector(tmp_path)
    with pytest.raises(ModelError, match="expected a 'baseline'"):
        Baseline.load(det)
    members = read_members(path)
    h = header(members)
    h["schema"] = 99
    set_header(members, h)
    rehash(members)
    write_members(path, members)
    with pytest.raises(ModelError, match="schema 99 is not supported"):
        Baseline.load(path)


def test_unknown_detector_kind_is_refused(tmp_path: Path) -> None:
    path = _save_detector(tmp_path)
    members = read_members(path)
    h = header(members)
    h["meta"]["kind"] = "os.system"
    set_header(members, h)
    rehash(members)
    write_members(path, members)
    with pytest.raises(ModelError, match=r"unknown detector kind 'os\.system'"):
        Detector.load(path)


def test_inconsistent_state_is_a_model_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "lm.npz"
    NgramLM(n=3).fit(TRAIN[:5]).save(path)
    members = read_members(path)
    h = header(members)
    h["meta"]["params"]["n"] = 5  # arrays for orders 4 and 5 do not exist
    set_header(members, h)
    rehash(members)
    write_members(path, members)
    with pytest.raises(ModelError, match="cannot rebuild"):
        Detector.load(path)


def test_truncated_files_are_refused(baseline: Baseline, tmp_path: Path) -> None:
    path = tmp_path / "b.npz"
    baseline.save(path)
    raw = path.read_bytes()
    for cut in (len(raw) - 1, len(raw) - 30, len(raw) // 2, 100, 10):
        p = tmp_path / f"cut{cut}.npz"
        p.write_bytes(raw[:cut])
        with pytest.raises(ModelError, match=str(p)):
            Baseline.load(p)


def _pickle_bomb(marker: Path) -> Any:
    class Bomb:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.mkdir, (str(marker),))

    return Bomb()


def test_npz_with_an_object_array_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.npz"
    Stide().fit(TRAIN[:5]).save(path)
    members = read_members(path)
    members["keys.npy"] = npy_bytes(np.array([_pickle_bomb(marker)], dtype=object))
    write_members(path, members)
    # the object array really is a pickle that would run os.mkdir if loaded with pickles allowed
    assert b"mkdir" in members["keys.npy"]
    with pytest.raises(ModelError, match="not a readable BAM model"):
        Detector.load(path)
    assert not marker.exists()
    # the same for a raw pickle file, and a plain .npy holding a pickle
    raw = tmp_path / "raw.npz"
    import pickle

    raw.write_bytes(pickle.dumps(_pickle_bomb(marker)))
    with pytest.raises(ModelError):
        Detector.load(raw)
    npy = tmp_path / "obj.npz"
    npy.write_bytes(npy_bytes(np.array([_pickle_bomb(marker)], dtype=object)))
    with pytest.raises(ModelError):
        Baseline.load(npy)
    assert not marker.exists()


def test_saving_refuses_non_numeric_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-numeric"):
        save_artifact(tmp_path / "x.npz", "detector", {}, {"a": np.array(["s"])})
    with pytest.raises(ValueError, match="reserved"):
        save_artifact(tmp_path / "x.npz", "detector", {}, {META: np.arange(2)})
    assert not list(tmp_path.iterdir())


def test_any_single_corrupted_byte_is_refused_or_harmless(tmp_path: Path) -> None:
    """Bit rot anywhere in the file: a ModelError (never zlib.error & co.), or the same model."""
    path = tmp_path / "small.npz"
    det = Stide(n=3).fit(TRAIN[:3])
    mid = det.save(path)
    raw = path.read_bytes()
    bad = tmp_path / "bad.npz"
    escaped: list[str] = []
    for pos in range(len(raw)):
        b = bytearray(raw)
        b[pos] ^= 0xFF
        bad.write_bytes(bytes(b))
        try:
            _, _, got = load_artifact(bad, "detector")
        except ModelError:
            continue
        except Exception as e:  # the point is to find what escapes
            escaped.append(f"byte {pos}: {type(e).__name__}")
            continue
        assert got == mid, pos  # loaded: then it must be the very same content
    assert not escaped, escaped[:5]


# --- vocabularies survive the round trip ----------------------------------------------------------


def test_model_with_an_unknown_syscall_name_reloads(tmp_path: Path) -> None:
    """A call no table knows gets a hashed id; its saved spelling must map back to it."""
    log = (
        '1 1.0 openat(AT_FDCWD, "/x", O_RDONLY) = 3\n'
        "1 1.1 frobnicate(3) = 0\n"
        '1 1.2 read(3, "", 1) = 0\n'
        "1 1.3 close(3) = 0\n"
    ) * 20
    t = parse_strace(log.splitlines(keepends=True))
    assert t.meta["unknown_names"]
    det = Stide(n=3).fit(t.sequences())
    path = tmp_path / "m.npz"
    det.save(path)
    loaded = Detector.load(path)
    np.testing.assert_array_equal(loaded.score(t.sequences()), det.score(t.sequences()))
