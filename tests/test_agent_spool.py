"""The agent's spool: order, bound (drop-oldest, counted), and the crash-safe chain."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from bam.agent.spool import InFlight, Spool, SpoolChain
from bam.evidence import EvidenceBuilder, SoftwareSigner
from bam.evidence.canonical import ZERO_DIGEST
from bam.evidence.token import ChainState
from evidence_support import make_behavior, make_measurements


def _obs(i: float) -> dict[str, object]:
    return {"behavior": {"window_start": i, "window_end": i + 1}, "measurements": {}}


def test_fifo_order_survives_reopen(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    for i in range(5):
        sp.push("w", "none", _obs(i))
    sp.close()
    sp = Spool(tmp_path / "s.db")
    assert sp.pending_count() == 5
    first = sp.oldest()
    assert first is not None
    assert first.payload["behavior"]["window_start"] == 0  # type: ignore[index]
    sp.close()


def test_full_spool_drops_oldest_and_counts(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db", max_pending=3)
    for i in range(7):
        sp.push("w", "none", _obs(i))
    assert sp.pending_count() == 3
    oldest = sp.oldest()
    assert oldest is not None
    assert oldest.payload["behavior"]["window_start"] == 4  # type: ignore[index]
    assert sp.get_meta("dropped") == "4"
    assert sp.take_unreported_drops() == 4
    assert sp.get_meta("dropped_first_window") == "0"
    sp.clear_unreported_drops(4)
    assert sp.take_unreported_drops() == 0
    sp.close()


def test_signed_token_and_chain_commit_together_and_roll_back(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    chain = SpoolChain(sp)
    builder = EvidenceBuilder(SoftwareSigner.generate(), chain=chain)
    pid = sp.push("w", "none", _obs(0))
    prev = sp.chain_state()
    assert prev == ChainState(0, ZERO_DIGEST)
    ev = builder.build("n" * 16, make_measurements("w"), make_behavior("none"))
    # build() alone changes nothing on disk: the state is committed with the token
    assert sp.chain_state() == prev
    assert chain.last_saved is not None
    sp.commit_signed(pid, prev, chain.last_saved, ev.token)
    sp.close()
    # "SIGKILL" here: a new process opens the same file
    sp = Spool(tmp_path / "s.db")
    inf = sp.inflight()
    assert inf is not None
    assert inf.token == ev.token
    assert sp.chain_state() == ChainState(1, ev.digest)
    # the server never stored it: roll back, the observation stays, seq 1 is reused
    sp.rollback_inflight()
    assert sp.chain_state() == prev
    assert sp.inflight() is None
    assert sp.pending_count() == 1
    sp.close()


def test_delivered_forgets_observation(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    chain = SpoolChain(sp)
    builder = EvidenceBuilder(SoftwareSigner.generate(), chain=chain)
    pid = sp.push("w", "none", _obs(0))
    ev = builder.build("n" * 16, make_measurements("w"), make_behavior("none"))
    assert chain.last_saved is not None
    sp.commit_signed(pid, ChainState(), chain.last_saved, ev.token)
    sp.delivered("affirming", "allow")
    assert sp.pending_count() == 0
    assert sp.inflight() is None
    assert sp.chain_state().seq == 1
    assert sp.delivered_log()[0]["action"] == "allow"
    sp.close()


def _sign_many(sp: Spool, builder: EvidenceBuilder, n: int) -> list[tuple[int, ChainState, str]]:
    """Sign the ``n`` oldest observations on top of each other (as a batch is signed)."""
    chain = builder.chain
    assert isinstance(chain, SpoolChain)
    signed = []
    try:
        for p in sp.oldest_n(n):
            ev = builder.build(f"nonce-{p.id:04d}", make_measurements("w"), make_behavior("none"))
            assert chain.last_saved is not None
            signed.append((p.id, chain.last_saved, ev.token))
            chain.overlay = chain.last_saved
    finally:
        chain.overlay = None
    return signed


def test_batch_in_flight_commits_delivers_in_order_and_rolls_back(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db", max_pending=4)
    builder = EvidenceBuilder(SoftwareSigner.generate(), chain=SpoolChain(sp))
    ids = [sp.push("w", "none", _obs(i)) for i in range(4)]
    signed = _sign_many(sp, builder, 3)
    assert [s[1].seq for s in signed] == [1, 2, 3]
    assert sp.chain_state() == ChainState()  # nothing on disk until committed
    with pytest.raises(ValueError, match="consecutive"):
        sp.commit_signed_many(ChainState(), [signed[0], signed[2]])
    with pytest.raises(RuntimeError, match="chain moved"):
        sp.commit_signed_many(signed[0][1], signed[1:])
    sp.commit_signed_many(ChainState(), signed)
    with pytest.raises(RuntimeError, match="already in flight"):
        sp.commit_signed_many(signed[2][1], _sign_many(sp, builder, 1))
    sp.close()
    # "SIGKILL": all three are in flight, in chain order, with the chain at seq 3
    sp = Spool(tmp_path / "s.db", max_pending=4)
    rows = sp.inflight_all()
    assert [(r.seq, r.pending_id, r.token) for r in rows] == [
        (s[1].seq, s[0], s[2]) for s in signed
    ]
    assert [r.prev_seq for r in rows] == [0, 1, 2]
    assert rows[1].prev_digest == rows[0].digest
    assert sp.chain_state() == signed[2][1]
    # a full spool never drops an observation whose token is in flight
    sp.push("w", "none", _obs(9))
    assert sp.get(ids[0]) is not None
    assert sp.get(ids[3]) is None
    with pytest.raises(RuntimeError, match="before the lower"):
        sp.delivered("affirming", "allow", seq=2)
    sp.delivered("affirming", "allow", seq=1)
    sp.delivered("affirming", "allow", seq=1)  # no longer in flight: a no-op
    assert [r.seq for r in sp.inflight_all()] == [2, 3]
    assert sp.get(ids[0]) is None
    # seq 2 refused for good: its observation dropped, the chain back at seq 1, seq 3 re-signed
    sp.rollback_inflight(drop_observation=True)
    assert sp.inflight_all() == []
    assert sp.chain_state() == signed[0][1]
    assert [p.id for p in sp.oldest_n(10)] == [ids[2], ids[2] + 2]
    assert [d["seq"] for d in sp.delivered_log()] == [1]
    sp.close()


def test_rollback_restores_the_state_before_the_lowest_in_flight(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    builder = EvidenceBuilder(SoftwareSigner.generate(), chain=SpoolChain(sp))
    for i in range(3):
        sp.push("w", "none", _obs(i))
    sp.commit_signed_many(ChainState(), _sign_many(sp, builder, 3))
    sp.rollback_inflight()
    assert sp.chain_state() == ChainState()
    assert sp.inflight() is None
    assert sp.pending_count() == 3
    # signed again at the same seqs
    again = _sign_many(sp, builder, 3)
    assert [s[1].seq for s in again] == [1, 2, 3]
    sp.close()


_OLD_SCHEMA = """
CREATE TABLE pending (
  id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, workload TEXT NOT NULL,
  severity TEXT NOT NULL, payload TEXT NOT NULL);
CREATE TABLE inflight (
  k INTEGER PRIMARY KEY CHECK (k = 1), pending_id INTEGER NOT NULL, seq INTEGER NOT NULL,
  prev_seq INTEGER NOT NULL, prev_digest TEXT NOT NULL, token TEXT NOT NULL,
  digest TEXT NOT NULL, signed_at REAL NOT NULL);
CREATE TABLE chain (k INTEGER PRIMARY KEY CHECK (k = 1), seq INTEGER NOT NULL, prev TEXT NOT NULL);
CREATE TABLE delivered (
  seq INTEGER PRIMARY KEY, pending_id INTEGER NOT NULL, workload TEXT NOT NULL,
  digest TEXT NOT NULL, delivered_at REAL NOT NULL, status TEXT, action TEXT);
CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""


def test_old_spool_file_is_migrated_keeping_its_in_flight_token(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = sqlite3.connect(path)
    db.executescript(_OLD_SCHEMA)
    db.execute("PRAGMA journal_mode=WAL")
    with db:
        db.execute("INSERT INTO pending VALUES (7, 1.0, 'w', 'none', ?)", (json.dumps(_obs(0)),))
        db.execute("INSERT INTO pending VALUES (8, 2.0, 'w', 'none', ?)", (json.dumps(_obs(1)),))
        db.execute("INSERT INTO chain VALUES (1, 5, ?)", ("d" * 64,))
        db.execute(
            "INSERT INTO inflight VALUES (1, 7, 5, 4, ?, 'tok', ?, 3.0)", ("c" * 64, "d" * 64)
        )
        db.execute("INSERT INTO meta VALUES ('last_action_id', '12')")
    db.close()
    sp = Spool(path)
    cols = [r[1] for r in sp._db.execute("PRAGMA table_info(inflight)")]
    assert "k" not in cols
    assert sp.inflight_all() == [InFlight(7, 5, 4, "c" * 64, "tok", "d" * 64, 3.0)]
    assert sp.chain_state() == ChainState(5, "d" * 64)
    assert sp.pending_count() == 2
    assert sp.get_meta("last_action_id") == "12"
    sp.close()
    sp = Spool(path)  # opening again changes nothing
    assert [r.seq for r in sp.inflight_all()] == [5]
    sp.rollback_inflight()
    assert sp.chain_state() == ChainState(4, "c" * 64)
    assert sp.inflight() is None
    assert sp.pending_count() == 2
    sp.close()


def test_discard_drops_a_waiting_observation_never_one_in_flight(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    chain = SpoolChain(sp)
    builder = EvidenceBuilder(SoftwareSigner.generate(), chain=chain)
    flying = sp.push("w", "none", _obs(0))
    waiting = sp.push("w", "none", _obs(1))
    prev = sp.chain_state()
    ev = builder.build("n" * 16, make_measurements("w"), make_behavior("none"))
    assert chain.last_saved is not None
    sp.commit_signed(flying, prev, chain.last_saved, ev.token)
    assert sp.discard(flying) is False  # its token is in flight: the chain depends on it
    assert sp.discard(waiting) is True
    assert sp.discard(waiting) is False
    assert sp.pending_count() == 1
    assert sp.get_meta("dropped") == "1"
    assert sp.take_unreported_drops() == 1
    sp.close()
