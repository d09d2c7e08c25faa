"""The agent's spool: order, bound (drop-oldest, counted), and the crash-safe chain."""

from __future__ import annotations

from pathlib import Path

from bam.agent.spool import Spool, SpoolChain
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
