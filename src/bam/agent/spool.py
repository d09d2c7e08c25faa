"""The agent's durable state: a FIFO of observations, the evidence chain, and its bookkeeping.

Why observations and not signed tokens: the server accepts a token only with a fresh,
single-use nonce (``nonce_ttl_s`` ≤ 60 s), so a token signed while the server is down could
never be delivered. The spool therefore keeps each *observation* (the behaviour summary and
measurements of one reporting window, with its real window times) and signs it only when it is
about to be sent, with a nonce the server has just issued. Nothing observed is lost, order is
kept, and ``bam_seq``/``bam_prev`` stay gap-free.

Crash safety (SIGKILL at any point): tokens are signed, then — in **one** SQLite transaction —
stored as the *in-flight* tokens (one, or a batch of consecutive seqs) together with the new
chain state (seq, digest); only then are they sent. After a restart the in-flight tokens are
sent again verbatim: each one the server had stored answers ``duplicate`` (delivered); from
the first one it had not stored and whose nonce is no longer usable, the chain is rolled back
to the state before that token (the server never saw it or anything after it) and those
observations are signed again. Either way the server's chain has no gap. In-flight tokens
are only ever delivered lowest seq first, and a rollback always restores the state before the
lowest remaining one and forgets them all. SQLite runs in WAL mode with ``synchronous=FULL``:
a committed state survives power loss, not just a crash.

Spool files written before batches kept at most one in-flight row (``k = 1``); opening one
migrates its ``inflight`` table in one transaction, keeping that row.

Bounded: at most ``max_pending`` observations wait. When full, the **oldest** waiting
observation is dropped (the newest state of a workload matters most to a verifier), the drop
is counted (``dropped`` and the window span lost) and reported in the next delivered
observation's ``top_features`` as ``spool_dropped=N`` so the verifier learns of it too.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bam.evidence.canonical import ZERO_DIGEST
from bam.evidence.token import ChainState

_INFLIGHT = """
CREATE TABLE IF NOT EXISTS inflight (
  seq INTEGER PRIMARY KEY,
  pending_id INTEGER NOT NULL UNIQUE,
  prev_seq INTEGER NOT NULL,
  prev_digest TEXT NOT NULL,
  token TEXT NOT NULL,
  digest TEXT NOT NULL,
  signed_at REAL NOT NULL
)"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS pending (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  created REAL NOT NULL,
  workload TEXT NOT NULL,
  severity TEXT NOT NULL,
  payload TEXT NOT NULL
);
{_INFLIGHT};
CREATE TABLE IF NOT EXISTS chain (
  k INTEGER PRIMARY KEY CHECK (k = 1),
  seq INTEGER NOT NULL,
  prev TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS delivered (
  seq INTEGER PRIMARY KEY,
  pending_id INTEGER NOT NULL,
  workload TEXT NOT NULL,
  digest TEXT NOT NULL,
  delivered_at REAL NOT NULL,
  status TEXT,
  action TEXT
);
CREATE TABLE IF NOT EXISTS meta (
  k TEXT PRIMARY KEY,
  v TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Pending:
    """One observation waiting to be signed and delivered."""

    id: int
    created: float
    workload: str
    severity: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class InFlight:
    """A signed token stored before sending (several, of consecutive seqs, for a batch)."""

    pending_id: int
    seq: int
    prev_seq: int
    prev_digest: str
    token: str
    digest: str
    signed_at: float


class Spool:
    """SQLite-backed spool; safe to use from several threads of one agent."""

    def __init__(self, path: str | Path, *, max_pending: int = 10_000, keep_delivered: int = 1000):
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_pending = max_pending
        self.keep_delivered = keep_delivered
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate_inflight()
        self._lock = threading.RLock()

    def _migrate_inflight(self) -> None:
        """Old spool files: ``inflight`` had one row at most (``k = 1``); keep that row."""
        cols = [str(r[1]) for r in self._db.execute("PRAGMA table_info(inflight)")]
        if "k" not in cols:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            cols = [str(r[1]) for r in self._db.execute("PRAGMA table_info(inflight)")]
            if "k" in cols:  # (re-checked under the write lock)
                self._db.execute("ALTER TABLE inflight RENAME TO inflight_v1")
                self._db.execute(_INFLIGHT)  # (not executescript: it would COMMIT first)
                self._db.execute(
                    "INSERT INTO inflight"
                    "(seq, pending_id, prev_seq, prev_digest, token, digest, signed_at) "
                    "SELECT seq, pending_id, prev_seq, prev_digest, token, digest, signed_at "
                    "FROM inflight_v1"
                )
                self._db.execute("DROP TABLE inflight_v1")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- meta
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                (key, value),
            )

    # ---------------------------------------------------------------- queue
    def push(self, workload: str, severity: str, payload: dict[str, Any]) -> int:
        """Append an observation (dropping the oldest waiting one if the spool is full)."""
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
                while n >= self.max_pending:  # (never an observation whose token is in flight)
                    row = self._db.execute(
                        "SELECT id, payload FROM pending "
                        "WHERE id NOT IN (SELECT pending_id FROM inflight) ORDER BY id LIMIT 1"
                    ).fetchone()
                    if row is None:
                        break
                    self._drop(row[0], row[1])
                    n -= 1
                cur = self._db.execute(
                    "INSERT INTO pending(created, workload, severity, payload) VALUES (?,?,?,?)",
                    (time.time(), workload, severity, text),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(cur.lastrowid or 0)

    def discard(self, pending_id: int) -> bool:
        """Drop one waiting observation that can never be signed (a malformed payload), so it
        does not block the ones behind it; counted and reported like a drop of a full spool.
        Never one whose token is in flight. False if there was no such observation."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT payload FROM pending "
                    "WHERE id = ? AND id NOT IN (SELECT pending_id FROM inflight)",
                    (pending_id,),
                ).fetchone()
                if row is not None:
                    self._drop(pending_id, row[0])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return row is not None

    def _drop(self, pending_id: int, payload_text: str) -> None:
        """Delete a waiting observation and count it (inside the caller's transaction)."""
        self._db.execute("DELETE FROM pending WHERE id = ?", (pending_id,))
        try:
            payload = json.loads(payload_text)
        except ValueError:
            payload = {}
        self._bump_dropped(payload if isinstance(payload, dict) else {})

    def _bump_dropped(self, payload: dict[str, Any]) -> None:
        d = int(self.get_meta("dropped", "0") or 0) + 1
        self.set_meta("dropped", str(d))
        self.set_meta(
            "dropped_unreported", str(int(self.get_meta("dropped_unreported", "0") or 0) + 1)
        )
        b = payload.get("behavior") or {}
        if isinstance(b, dict) and "window_start" in b:
            first = self.get_meta("dropped_first_window")
            if first is None:
                self.set_meta("dropped_first_window", str(b["window_start"]))
            self.set_meta("dropped_last_window", str(b.get("window_end", b["window_start"])))

    def take_unreported_drops(self) -> int:
        """Drops not yet reported to the verifier (reset by the caller's next delivery)."""
        return int(self.get_meta("dropped_unreported", "0") or 0)

    def clear_unreported_drops(self, n: int) -> None:
        with self._lock:
            left = max(0, int(self.get_meta("dropped_unreported", "0") or 0) - n)
            self.set_meta("dropped_unreported", str(left))

    def oldest(self) -> Pending | None:
        first = self.oldest_n(1)
        return first[0] if first else None

    def oldest_n(self, n: int) -> list[Pending]:
        """The ``n`` oldest waiting observations, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, created, workload, severity, payload FROM pending ORDER BY id LIMIT ?",
                (n,),
            ).fetchall()
        return [
            Pending(int(r[0]), float(r[1]), str(r[2]), str(r[3]), json.loads(r[4])) for r in rows
        ]

    def get(self, pending_id: int) -> Pending | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, created, workload, severity, payload FROM pending WHERE id = ?",
                (pending_id,),
            ).fetchone()
        if row is None:
            return None
        return Pending(int(row[0]), float(row[1]), str(row[2]), str(row[3]), json.loads(row[4]))

    def pending_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0])

    # ---------------------------------------------------------------- chain
    def chain_state(self) -> ChainState:
        with self._lock:
            row = self._db.execute("SELECT seq, prev FROM chain").fetchone()
        return ChainState(int(row[0]), str(row[1])) if row else ChainState(0, ZERO_DIGEST)

    def inflight(self) -> InFlight | None:
        """The lowest in-flight token (the next to be delivered), if any."""
        rows = self.inflight_all()
        return rows[0] if rows else None

    def inflight_all(self) -> list[InFlight]:
        """Every in-flight token, in chain order (lowest seq first)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT pending_id, seq, prev_seq, prev_digest, token, digest, signed_at "
                "FROM inflight ORDER BY seq"
            ).fetchall()
        return [
            InFlight(int(r[0]), int(r[1]), int(r[2]), str(r[3]), str(r[4]), str(r[5]), float(r[6]))
            for r in rows
        ]

    def commit_signed(self, pending_id: int, prev: ChainState, new: ChainState, token: str) -> None:
        """Atomically: the token becomes in-flight and the chain advances to ``new``."""
        self.commit_signed_many(prev, [(pending_id, new, token)])

    def commit_signed_many(
        self, prev: ChainState, signed: list[tuple[int, ChainState, str]]
    ) -> None:
        """Atomically: every ``(pending_id, new_state, token)`` (in chain order, the first
        signed on top of ``prev``) becomes in-flight and the chain advances to the last state.

        Refused (nothing changes) if a token is already in flight or the chain moved."""
        if not signed:
            raise ValueError("nothing to commit")
        rows = []
        before = prev
        for pending_id, new, token in signed:
            if new.seq != before.seq + 1:
                raise ValueError(f"not consecutive: seq {new.seq} after {before.seq}")
            rows.append((new.seq, pending_id, before.seq, before.prev, token, new.prev))
            before = new
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("SELECT seq, prev FROM chain").fetchone()
                have = ChainState(int(cur[0]), str(cur[1])) if cur else ChainState(0, ZERO_DIGEST)
                if have != prev:
                    raise RuntimeError(f"chain moved under the signer: {have} != {prev}")
                if self._db.execute("SELECT 1 FROM inflight").fetchone():
                    raise RuntimeError("a token is already in flight")
                self._db.execute(
                    "INSERT INTO chain(k, seq, prev) VALUES (1, ?, ?) "
                    "ON CONFLICT(k) DO UPDATE SET seq = excluded.seq, prev = excluded.prev",
                    (before.seq, before.prev),
                )
                now = time.time()
                self._db.executemany(
                    "INSERT INTO inflight"
                    "(seq, pending_id, prev_seq, prev_digest, token, digest, signed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(*r, now) for r in rows],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delivered(
        self, status: str | None = None, action: str | None = None, seq: int | None = None
    ) -> None:
        """The in-flight token ``seq`` (default: the lowest) was accepted: forget it and its
        observation. Only the lowest in-flight token can be delivered (the server stores a
        chain in order); a ``seq`` no longer in flight is a no-op."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT pending_id, seq, digest FROM inflight ORDER BY seq LIMIT 1"
                ).fetchone()
                if row is not None and seq is not None and int(row[1]) != seq:
                    if int(row[1]) < seq:
                        raise RuntimeError(
                            f"seq {seq} delivered before the lower in-flight seq {row[1]}"
                        )
                    row = None  # already delivered
                if row is None:
                    self._db.execute("COMMIT")
                    return
                wl = self._db.execute(
                    "SELECT workload FROM pending WHERE id = ?", (row[0],)
                ).fetchone()
                self._db.execute("DELETE FROM pending WHERE id = ?", (row[0],))
                self._db.execute("DELETE FROM inflight WHERE seq = ?", (row[1],))
                self._db.execute(
                    "INSERT OR REPLACE INTO delivered VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (row[1], row[0], wl[0] if wl else "", row[2], time.time(), status, action),
                )
                self._db.execute(
                    "DELETE FROM delivered WHERE seq <= ?", (int(row[1]) - self.keep_delivered,)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def rollback_inflight(self, drop_observation: bool = False) -> None:
        """The server stored none of the remaining in-flight tokens: restore the chain as it
        was before the lowest of them and forget them all (so the re-signed observations reuse
        the same seqs: no gap). ``drop_observation`` drops the lowest one's observation, for a
        token the server refused for good (it is logged by the caller); the others are kept
        and signed again."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT pending_id, prev_seq, prev_digest FROM inflight ORDER BY seq LIMIT 1"
                ).fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE chain SET seq = ?, prev = ? WHERE k = 1", (row[1], row[2])
                    )
                    self._db.execute("DELETE FROM inflight")
                    if drop_observation:
                        self._db.execute("DELETE FROM pending WHERE id = ?", (row[0],))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delivered_log(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, pending_id, workload, digest, delivered_at, status, action "
                "FROM delivered ORDER BY seq"
            ).fetchall()
        keys = ("seq", "pending_id", "workload", "digest", "delivered_at", "status", "action")
        return [dict(zip(keys, r, strict=True)) for r in rows]


class SpoolChain:
    """The :class:`~bam.evidence.token.ChainStore` the builder signs with.

    ``load`` reads the committed state; ``save`` only remembers the new state: it is committed
    by :meth:`Spool.commit_signed` (or ``commit_signed_many``) together with the token, never
    on its own. To sign several tokens before committing them together, the signer sets
    ``overlay`` to the last state it signed: ``load`` then returns it instead of the committed
    state (cleared again by the signer, committed or not)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.last_saved: ChainState | None = None
        self.overlay: ChainState | None = None

    def load(self) -> ChainState:
        if self.overlay is not None:
            return self.overlay
        return self.spool.chain_state()

    def save(self, state: ChainState) -> None:
        self.last_saved = state
