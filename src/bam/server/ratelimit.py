"""Rate limits: per agent in the database (shared by replicas), per process for the rest.

Agents: a fixed one-minute window counted in ``rate_counters`` with one upsert inside the
request's own transaction, so N replicas together allow an agent exactly its limit. A cheap
read of the same counter runs *before* the expensive work (signature checks, policy), so a
flooding agent is turned away early.

Operators and failed authentications: token buckets in process memory. They cost nothing on
the database, and their purpose (blunting brute force and runaway scripts) survives being
per replica; with N replicas the effective limit is N × the setting (documented).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite

from bam.server.db.models import RateCounter, table
from bam.server.errors import ServerError

WINDOW_S = 60
_rc = table(RateCounter)


def window(now: float) -> int:
    """The counting window ``now`` falls in."""
    return int(now // WINDOW_S)


_window = window


_PEEK = select(_rc.c.count).where(
    _rc.c.subject == bindparam("subject"), _rc.c.window == bindparam("window")
)


@functools.lru_cache(maxsize=4)
def _upsert(dialect: str) -> Any:
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_rc)
    return (
        ins.values(subject=bindparam("subject"), window=bindparam("window"), count=1)
        .on_conflict_do_update(
            index_elements=[_rc.c.subject, _rc.c.window], set_={"count": _rc.c.count + 1}
        )
        .returning(_rc.c.count)
    )


def peek(conn: Connection, subject: str, limit: int, now: float) -> None:
    """Raise 429 if ``subject`` already used its budget in this window (read only)."""
    used = conn.execute(_PEEK, {"subject": subject, "window": _window(now)}).scalar()
    if used is not None and used >= limit:
        raise limited(subject, limit, now)


def hit(conn: Connection, subject: str, limit: int, now: float) -> None:
    """Count one request for ``subject`` (in the caller's transaction); 429 over the limit."""
    count = conn.execute(
        _upsert(conn.dialect.name), {"subject": subject, "window": _window(now)}
    ).scalar_one()
    if count > limit:
        raise limited(subject, limit, now)


def limited(subject: str, limit: int, now: float) -> ServerError:
    """The 429 for ``subject`` over ``limit`` in the window of ``now``."""
    retry = WINDOW_S - (now % WINDOW_S)
    return ServerError(
        429,
        "rate_limited",
        f"more than {limit} requests per minute; retry in {retry:.0f} s",
        headers={"Retry-After": str(int(retry) + 1)},
    )


def purge_before(now: float) -> int:
    """The oldest window still worth keeping (older ones can be deleted)."""
    return _window(now) - 2


class TokenBuckets:
    """In-process token buckets keyed by a string (operator token, client address)."""

    def __init__(
        self, per_minute: int, burst: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(per_minute // 4, 10))
        self.clock = clock
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens; False if the bucket is empty."""
        now = self.clock()
        with self._lock:
            tokens, last = self._state.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= cost
            if ok:
                tokens -= cost
            self._state[key] = (tokens, now)
            if len(self._state) > 100_000:  # bound memory under address-spraying
                self._state.clear()
        return ok

    def empty(self, key: str) -> bool:
        """True if ``key`` has no token left (without taking one)."""
        now = self.clock()
        with self._lock:
            tokens, last = self._state.get(key, (self.burst, now))
            return min(self.burst, tokens + (now - last) * self.rate) < 1.0
