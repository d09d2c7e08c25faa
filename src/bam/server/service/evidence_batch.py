"""Evidence in batches: several tokens of one agent's chain, appraised and stored together.

An agent that watches many workloads produces one token per workload per interval, all links
of its one chain. Sent one by one, each token pays a request's fixed costs (HTTP, a database
round, a commit) and waits for the previous answer, which carries its nonce. A batch sends
them together, each signed over its own single-use nonce (from ``POST /v1/challenge?count=K``
or from the previous batch's answers), and every token is still verified completely and
appraised on its own: a batch changes what a request costs, not what is checked.

Rules:

* **In chain order.** Token *i* is verified against the chain head that tokens before it
  will write (:class:`~bam.server.service.evidence._Carry`); the write transaction re-checks
  every compare-and-set, so the overlay is an optimisation, never a source of truth.
* **Stop at the first rejection.** The tokens before it are stored; it gets its own error;
  the tokens after it get ``424 batch_aborted`` and nothing of them is stored (they were
  chained onto a token the server refused, exactly as with single submissions, the agent's
  next token then shows up as a sequence gap).
* **One transaction.** The writes of a batch commit together (one unit of the SQLite group
  committer; one transaction on PostgreSQL). A write that fails its re-checks is dropped with
  everything after it and the rest is written again.
* **Idempotent.** A batch sent again answers each stored token as a duplicate.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool

from bam.server.db.groupcommit import CommitFailedError
from bam.server.errors import ChainDivergedError, ServerError
from bam.server.service.appraisal import RetryError
from bam.server.service.evidence import (
    _ATTEMPTS,
    EvidenceMixin,
    EvidenceOutcome,
    _Carry,
    _conflict,
    _parse,
    _Write,
)

MAX_BATCH = 64
"""Tokens per batch (the request body limit may allow fewer)."""

BatchItem = EvidenceOutcome | ServerError
"""Per token: its outcome, or the error it was rejected with."""


class _WriteFailedError(Exception):
    """Write number ``index`` of a batch failed its re-checks with ``error``."""

    def __init__(self, index: int, error: ServerError | RetryError) -> None:
        super().__init__(index)
        self.index = index
        self.error = error


def aborted() -> ServerError:
    """The answer for a token after a rejected one (not processed, nothing stored)."""
    return ServerError(
        424, "batch_aborted", "not processed: an earlier token of this batch was rejected"
    )


class EvidenceBatchMixin(EvidenceMixin):
    """Several evidence tokens of one agent per request (see the module docstring)."""

    def submit_evidence_batch(self, tokens: Sequence[str]) -> list[BatchItem]:
        """Blocking version of :meth:`submit_evidence_batch_async` (PostgreSQL, CLI, tests)."""
        parsed = _parse_batch(tokens)
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            n = len(parsed)
            tail: list[BatchItem] = []
            for _attempt in range(_ATTEMPTS + len(parsed)):
                items = self._prepare_batch(cur, parsed[:n])
                for refusal in _refusals(items):
                    raw.rollback()
                    self.note_refusal(refusal)
                writes = [x for x in items if isinstance(x, _Write)]
                try:
                    ids = self._store_batch(raw, cur, writes)
                except _WriteFailedError as f:
                    raw.rollback()
                    n, tail = _shrink(items, f, n, tail)
                    continue
                return _answers(items, ids) + tail
            raise _conflict()
        finally:
            try:
                raw.rollback()
            finally:
                raw.close()

    async def submit_evidence_batch_async(self, tokens: Sequence[str]) -> list[BatchItem]:
        """Verify, appraise and store ``tokens`` in order; one answer per token.

        A ``ServerError`` is raised (for the whole request) only when the batch itself is
        malformed or its first token does not authenticate the agent.
        """
        db = self._loop_db()
        if db is None:
            return await run_in_threadpool(self.submit_evidence_batch, tokens)
        parsed = _parse_batch(tokens)
        n = len(parsed)
        tail: list[BatchItem] = []
        for _attempt in range(_ATTEMPTS + len(parsed)):
            items = self._prepare_batch(db.cursor, parsed[:n])
            for refusal in _refusals(items):
                await run_in_threadpool(self.note_refusal, refusal)
            writes = [x for x in items if isinstance(x, _Write)]
            if not writes:
                return _answers(items, []) + tail
            try:
                ids = await db.committer.run(functools.partial(self._write_batch, writes))
            except _WriteFailedError as f:
                n, tail = _shrink(items, f, n, tail)
                continue
            except CommitFailedError as e:
                failed = ServerError(503, "store_unavailable", f"{e}; retry")
                return [failed if isinstance(x, _Write) else x for x in items] + tail
            return _answers(items, ids) + tail
        raise _conflict()

    def _prepare_batch(
        self, cur: Any, parsed: Sequence[tuple[str, str, str]]
    ) -> list[EvidenceOutcome | ServerError | _Write]:
        """Appraise in chain order until the first rejection (the rest: ``batch_aborted``)."""
        carry = _Carry()
        items: list[EvidenceOutcome | ServerError | _Write] = []
        for i, (text, digest, kid) in enumerate(parsed):
            try:
                prepared = self._prepare(cur, text, digest, kid, carry)
            except ServerError as e:
                if i == 0 and e.status in (401, 403):
                    raise  # the agent is not authenticated: the whole request fails
                items.append(e)
                items.extend(aborted() for _ in parsed[i + 1 :])
                break
            if isinstance(prepared, _Write):
                carry.advance(prepared)
            items.append(prepared)
        return items

    def _write_batch(self, writes: list[_Write], cur: Any) -> list[tuple[int, int]]:
        """Every write of the batch, in order, in the caller's transaction (all or nothing):
        one group-commit unit on SQLite, part of the blocking path's transaction otherwise."""
        ids = []
        for j, w in enumerate(writes):
            try:
                if self._hot.postgresql:
                    ids.append(self._write_postgresql(cur, w))
                else:
                    ids.append(self._write_sqlite(w, cur))
            except (ServerError, RetryError) as e:
                raise _WriteFailedError(j, e) from None
        return ids

    def _store_batch(self, raw: Any, cur: Any, writes: list[_Write]) -> list[tuple[int, int]]:
        """The blocking path: every write of the batch in one transaction, committed."""
        if not writes:
            return []
        if not self._hot.postgresql:
            cur.execute("BEGIN IMMEDIATE")
        ids = self._write_batch(writes, cur)
        raw.commit()
        return ids


def _refusals(items: Sequence[object]) -> list[ChainDivergedError]:
    """The chain refusals among a batch's answers (at most one: processing stops there)."""
    return [x for x in items if isinstance(x, ChainDivergedError)]


def _parse_batch(tokens: Sequence[str]) -> list[tuple[str, str, str]]:
    """Each token's ``(text, sha256, kid)``; the batch must be one agent's distinct tokens."""
    if not 1 <= len(tokens) <= MAX_BATCH:
        raise ServerError(422, "batch_invalid", f"a batch has 1 to {MAX_BATCH} tokens")
    parsed = [_parse(t) for t in tokens]
    if len({kid for _, _, kid in parsed}) != 1:
        raise ServerError(422, "batch_invalid", "all tokens of a batch must be one agent's")
    if len({digest for _, digest, _ in parsed}) != len(parsed):
        raise ServerError(422, "batch_invalid", "a batch must not repeat a token")
    return parsed


def _shrink(
    items: list[EvidenceOutcome | ServerError | _Write],
    failed: _WriteFailedError,
    n: int,
    tail: list[BatchItem],
) -> tuple[int, list[BatchItem]]:
    """After write ``failed.index`` failed: how many tokens to try again, and the answers after.

    A lost compare-and-set (``RetryError``: something else moved the chain or a workload)
    retries the same tokens; a rejection answers that token and aborts the ones after it.
    """
    if isinstance(failed.error, RetryError):
        return n, tail
    positions = [i for i, x in enumerate(items) if isinstance(x, _Write)]
    pos = positions[failed.index]
    return pos, [failed.error, *(aborted() for _ in range(pos + 1, n)), *tail]


def _answers(
    items: list[EvidenceOutcome | ServerError | _Write], ids: list[tuple[int, int]]
) -> list[BatchItem]:
    """Items with each write replaced by its committed outcome (``ids`` in write order)."""
    written = iter(ids)
    return [x.outcome(next(written)) if isinstance(x, _Write) else x for x in items]
