"""The agent's durable state: a FIFO of observations, the evidence chain, and its bookkeeping.

Why observations and not signed tokens: the server accepts a token only with a fresh,
single-use nonce (``nonce_ttl_s`` ≤ 60 s), so a token signed while the server is down could
never be delivered. The spool therefore keeps each *observation* (the behaviour summary and
measurements of one reporting window, with its real window times) and signs it only when it is
about to be sent, with a nonce the server has just issued. Nothing observed is lost, order is
kept, and ``bam_seq``/``bam_prev`` stay gap-free.

Crash safety (SIGKILL at any point): a token is signed, then — in **one** SQLite transaction —
stored as the single *in-flight* token together with the new chain state (seq, digest); only
then is it sent. After a restart the in-flight token is sent again verbatim: if the server had
stored it the answer is ``duplicate`` (delivered); if it had not and its nonce is no longer
usable, the chain is rolled back to the state before that token (the server never saw it) and
the observation is signed again. Either way the server's chain has no gap. SQLite runs in WAL
mode with ``synchronous=FULL``: a committed state survives power loss, not just a crash.

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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  created REAL NOT NULL,
  workload TEXT NOT NULL,
  severity TEXT NOT NULL,
  payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS inflight (
  k INTEGER PRIMARY KEY CHECK (k = 1),
  pending_id INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  prev_seq INTEGER NOT NULL,
  prev_digest TEXT NOT NULL,
  token TEXT NOT NULL,
  digest TEXT NOT NULL,
  signed_at REAL NOT NULL
);
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
    """A signed token stored before sending (at most one at a time)."""

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
        self._lock = threading.RLock()

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
                inflight = self._db.execute("SELECT pending_id FROM inflight").fetchone()
                while n >= self.max_pending:
                    q = "SELECT id, payload FROM pending"
                    args: tuple[int, ...] = ()
                    if inflight:
                        q += " WHERE id != ?"
                        args = (inflight[0],)
                    row = self._db.execute(q + " ORDER BY id LIMIT 1", args).fetchone()
                    if row is None:
                        break
                    self._db.execute("DELETE FROM pending WHERE id = ?", (row[0],))
                    self._bump_dropped(json.loads(row[1]))
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

    def _bump_dropped(self, payload: dict[str, Any]) -> None:
        d = int(self.get_meta("dropped", "0") or 0) + 1
        self.set_meta("dropped", str(d))
        self.set_meta(
            "dropped_unreported", str(int(self.get_meta("dropped_unreported", "0") or 0) + 1)
        )
        b = payload.get("behavior") or {}
        if "window_start" in b:
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
        with self._lock:
            row = self._db.execute(
                "SELECT id, created, workload, severity, payload FROM pending ORDER BY id LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        return Pending(int(row[0]), float(row[1]), str(row[2]), str(row[3]), json.loads(row[4]))

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
        with self._lock:
            row = self._db.execute(
                "SELECT pending_id, seq, prev_seq, prev_digest, token, digest, signed_at "
                "FROM inflight"
            ).fetchone()
        if row is None:
            return None
        return InFlight(
            int(row[0]),
            int(row[1]),
            int(row[2]),
            str(row[3]),
            str(row[4]),
            str(row[5]),
            float(row[6]),
        )

    def commit_signed(self, pending_id: int, prev: ChainState, new: ChainState, token: str) -> None:
        """Atomically: the token becomes in-flight and the chain advances to ``new``."""
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
                    (new.seq, new.prev),
                )
                self._db.execute(
                    "INSERT INTO inflight VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                    (pending_id, new.seq, prev.seq, prev.prev, token, new.prev, time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delivered(self, status: str | None = None, action: str | None = None) -> None:
        """The in-flight token was accepted: forget it and its observation."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT pending_id, seq, digest FROM inflight").fetchone()
                if row is None:
                    self._db.execute("COMMIT")
                    return
                wl = self._db.execute(
                    "SELECT workload FROM pending WHERE id = ?", (row[0],)
                ).fetchone()
                self._db.execute("DELETE FROM pending WHERE id = ?", (row[0],))
                self._db.execute("DELETE FROM inflight")
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
        """The server never stored the in-flight token: restore the chain as it was before it
        (so the re-signed observation reuses the same seq: no gap). ``drop_observation`` for a
        token the server refused for good (it is logged by the caller)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT pending_id, prev_seq, prev_digest FROM inflight"
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
    by :meth:`Spool.commit_signed` together with the token, never on its own."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.last_saved: ChainState | None = None

    def load(self) -> ChainState:
        return self.spool.chain_state()

    def save(self, state: ChainState) -> None:
        self.last_saved = state
