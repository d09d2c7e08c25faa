"""Group commit for SQLite, on the event loop: many evidence writes per COMMIT, no thread.

SQLite has one write lock per database. With every request opening its own write
transaction, requests queue on that lock through SQLite's busy handler, which polls with
sleeps of 1, 2, 5, 10 … ms: lost time and a long latency tail; and each COMMIT writes the WAL
pages it touched (the ``workloads`` and ``agents`` pages, the indexes) even when the next
transaction touches the same ones. Handing writes to a writer thread fixes the queueing but
costs two thread switches and GIL hand-overs per request (~0.3 ms of CPU here, more than the
write itself).

:class:`LoopGroupCommitter` batches on the event loop's own thread instead. A request that
has verified and appraised its evidence queues a unit of work (a function of a DB-API cursor)
and awaits it; the first unit of a loop iteration schedules one flush with ``call_soon``, so
every unit queued during that iteration — by requests whose data arrived together — shares
it. The flush opens one transaction (``BEGIN IMMEDIATE``), runs each unit inside its own
``SAVEPOINT`` (a unit that raises is rolled back to it and gets its exception; the others are
unaffected), COMMITs, and only then resolves the waiting requests. **Nothing is acknowledged
before the COMMIT that contains it has returned**; if the COMMIT fails, every unit of the
batch gets :class:`CommitFailedError` and nothing of it is stored.

The loop never waits for a lock. Writers of the same database in other processes (the other
workers) are kept apart by a non-blocking ``flock`` on ``<database>-writer.lock``; and the
writer connection has no busy timeout, so a write lock held by anyone else (the CLI, a
challenge request) makes ``BEGIN IMMEDIATE`` fail at once. In both cases the flush is retried
a moment later while the loop serves other requests — whose writes join the waiting batch.
The ``flock`` is advisory and only an optimisation (SQLite's own lock decides); the kernel
drops it when a process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("bam.server")

T = TypeVar("T")
Work = Callable[[Any], Any]
_RETRY_S = 0.0005
_GIVE_UP_S = 30.0  # as the busy timeout of every other connection


class CommitFailedError(Exception):
    """The batch's transaction failed: none of its units was stored."""


class LoopGroupCommitter:
    """Group commit for one event loop over one SQLite connection (see the module doc)."""

    def __init__(
        self,
        connection: Any,
        lock_path: Path | None = None,
        max_batch: int = 64,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        """``connection``: a DB-API SQLite connection in autocommit (``isolation_level=None``),
        for this committer alone (its busy timeout is set to 0; it is closed with the committer).

        ``observe(units)`` is called after each COMMIT (metrics).
        """
        self._conn = connection
        self._conn.execute("PRAGMA busy_timeout=0")  # never block the loop on SQLite's lock
        self._lock_fd = (
            os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600) if lock_path is not None else None
        )
        self._max_batch = max_batch
        self._observe = observe
        self._pending: list[tuple[Work, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._waiting_since: float | None = None
        self._closed = False
        self.batches = self.units = 0  # counters, for tests

    async def run(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in the next shared transaction; its result once committed.

        Raises what ``work`` raised (its changes rolled back), or :class:`CommitFailedError`.
        """
        if self._closed:
            raise CommitFailedError("the writer is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((work, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def close(self) -> None:
        """Fail whatever is still queued and release the connection and lock file."""
        self._closed = True
        self._fail(self._pending, CommitFailedError("the writer closed"))
        self._pending = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._conn.close()

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending or self._closed:
            return
        loop = asyncio.get_running_loop()
        if not self._lock():
            self._retry(loop)  # another worker process is writing
            return
        batch = self._pending[: self._max_batch]
        outcomes: list[tuple[bool, Any]] = []
        try:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                if "locked" in str(e) or "busy" in str(e):
                    self._retry(loop)  # another writer (not one of ours) holds SQLite's lock
                    return
                raise
            self._waiting_since = None
            del self._pending[: len(batch)]
            outcomes = self._transaction(batch)
        except Exception as e:
            log.error("group commit of %d unit(s) failed: %s", len(batch), e)
            self._pending = [p for p in self._pending if p not in batch]
            failed = CommitFailedError(f"the write transaction failed: {type(e).__name__}")
            self._fail(batch, failed)
            return
        finally:
            self._unlock()
            if self._pending and not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._flush)
        self.batches += 1
        self.units += len(batch)
        if self._observe is not None:
            self._observe(len(batch))
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():  # the request was cancelled (client gone): nothing to tell
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _transaction(self, batch: list[tuple[Work, asyncio.Future[Any]]]) -> list[tuple[bool, Any]]:
        """Run the units inside the open transaction, COMMIT; per-unit outcomes."""
        cur = self._conn.cursor()
        outcomes: list[tuple[bool, Any]] = []
        try:
            for work, _ in batch:
                cur.execute("SAVEPOINT unit")
                try:
                    outcomes.append((True, work(cur)))
                except Exception as e:  # this unit only: undo it, keep the others
                    cur.execute("ROLLBACK TO unit")
                    outcomes.append((False, e))
                cur.execute("RELEASE unit")
            cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                cur.execute("ROLLBACK")
            raise
        return outcomes

    def _retry(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        if self._waiting_since is None:
            self._waiting_since = now
        elif now - self._waiting_since > _GIVE_UP_S:
            self._waiting_since = None
            batch, self._pending = self._pending, []
            self._fail(batch, CommitFailedError("the database stayed locked"))
            return
        self._scheduled = True
        loop.call_later(_RETRY_S, self._flush)

    def _lock(self) -> bool:
        if self._lock_fd is None:
            return True
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @staticmethod
    def _fail(batch: list[tuple[Work, asyncio.Future[Any]]], error: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
