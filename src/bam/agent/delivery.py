"""Deliver spooled observations in order: challenge → sign → store in flight → send.

See :mod:`bam.agent.spool` for why observations are signed at delivery time and how a crash
between signing and the server's answer is resolved without a chain gap. Transport failures
and server-side overload (5xx, 429, 409 conflict) leave everything in place and back off
(0.25 s doubling to 5 s); a token refused for good (a 4xx that retrying cannot change) is
logged, its observation dropped and the chain rolled back so later tokens still link.

Batches: when several observations wait (an agent with many targets makes one per target
per interval), up to ``batch_max`` of the oldest are signed in order, each over its own nonce
(the ones the previous answers carried while still fresh, ``POST /v1/challenge?count=n`` for
the rest), committed in flight together and sent as one ``POST /v1/evidence/batch``. The
answers are handled in order with the single-token rules: each stored token is delivered;
at the first one not stored, a nonce refusal or ``batch_aborted`` rolls the chain back to
before it (it and the ones after are signed again), a transient refusal keeps it and the
ones after in flight (resent verbatim later: stored ones answer ``duplicate``), and a
refusal for good drops its observation and rolls back the rest. One waiting observation
takes the single-token path (``POST /v1/evidence``) as before. A server without the batch
endpoint (404/405) or that refuses a batch as such makes the agent fall back to single
tokens (a body too large halves the batch size instead).

Blocked: some refusals are about the agent, not a token, and no token can change them until an
operator acts: the agent is unknown, revoked or its key refused (401/403), or its chain no longer
links to the server's (``seq_replay``, ``chain_broken``: a wiped or restored spool, a cloned
agent). Dropping observations one by one would lose them all for nothing, so everything stays
spooled, the reason is logged once as an error and shown as ``blocked``, and the agent asks
again once a minute (after ``bam server reset-chain`` for a diverged chain).

Measured files by reference: once the server has stored a token carrying a workload's file
list, later tokens with the same list give only its digest (``files_sha256``), which is most
of a token's size and of its verification cost. The agent remembers which lists the server
acknowledged (in memory: after a restart the first token of each list is sent in full again);
a ``measurements_unknown`` refusal forgets them all and signs the token again in full.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bam.agent.spool import InFlight, Pending, Spool, SpoolChain
from bam.evidence.claims import BehaviorSummary, Measurements
from bam.evidence.token import ChainState, EvidenceBuilder
from bam.server.client import AgentClient, ApiError

log = logging.getLogger("bam.agent")

# a token refused for its nonce was not stored and never can be: sign the observation again
NONCE_REASONS = frozenset(
    {"nonce_expired", "nonce_unknown", "nonce_used", "nonce_stale", "nonce_reused"}
)
# a token that gave its files by reference to a list the server does not hold (a restored
# database): sign it again with the list in full
FILES_UNKNOWN = "measurements_unknown"
RESIGN_REASONS = NONCE_REASONS | {FILES_UNKNOWN}
RETRY_STATUS = frozenset({408, 409, 425, 429})
# the chain no longer links to the server's head: an operator must reset it
CHAIN_DIVERGED = frozenset({"seq_replay", "chain_broken"})
AGENT_REFUSED = frozenset({401, 403})
BLOCKED_RETRY_S = 60.0
MAX_BATCH = 64
"""The server's limit on tokens per batch (and nonces per challenge)."""
MAX_SERVER_FILES = 4096
"""File-list digests remembered as stored by the server (all forgotten when full)."""


@dataclass
class Delivered:
    """One observation's fate."""

    workload: str
    seq: int
    ok: bool
    status: str | None = None
    action: str | None = None
    reasons: list[str] = field(default_factory=list)
    duplicate: bool = False
    error: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    sent_at: float = 0.0


class Delivery:
    """Moves the spool to the server; :meth:`pump` never raises on a server outage."""

    def __init__(
        self,
        spool: Spool,
        client: AgentClient,
        builder: EvidenceBuilder,
        *,
        batch_max: int = 16,
    ) -> None:
        if not isinstance(builder.chain, SpoolChain):
            raise TypeError("the builder must sign with the spool's chain (SpoolChain)")
        self.spool = spool
        self.client = client
        self.builder = builder
        self.chain: SpoolChain = builder.chain
        self.batch_max = max(1, min(MAX_BATCH, batch_max))
        self.nonces: list[tuple[str, float]] = []  # (nonce, expires_at) from answers
        self.backoff_s = 0.0
        self.retry_at = 0.0
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.server_files: set[str] = set()
        """``files_sha256`` of the lists the server has stored (tokens may refer to them)."""
        self._signed_files: dict[int, str] = {}  # seq -> files_sha256, until answered
        self.blocked: str | None = spool.get_meta("blocked") or None
        """Why the server refuses this agent until an operator acts (None: it does not);
        kept in the spool so that ``bam agent status`` shows it."""

    @property
    def server_up(self) -> bool:
        return self.down_since is None

    def pump(self, budget_s: float = 1.0, max_items: int = 10_000) -> list[Delivered]:
        """Deliver as much as possible within ``budget_s``; stops at the first outage."""
        out: list[Delivered] = []
        end = time.monotonic() + budget_s
        while len(out) < max_items and time.monotonic() < end:
            if time.monotonic() < self.retry_at:
                break
            try:
                got, retry = self._round(max_items - len(out))
            except _BlockedError as e:
                self._blocked(str(e))
                break
            except (httpx.TransportError, _RetryError) as e:
                self._failed(str(e) or type(e).__name__)
                break
            out.extend(got)
            if retry is not None:  # some were delivered, the rest is kept for later
                self._failed(retry)
                break
            if not got:
                break
            self._ok()
        return out

    def _failed(self, why: str) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            log.warning("server unreachable (%s): spooling", why)
        self.last_error = why
        self.backoff_s = min(5.0, max(0.25, self.backoff_s * 2))
        self.retry_at = time.monotonic() + self.backoff_s
        self.nonces = []

    def _blocked(self, why: str) -> None:
        if why != self.blocked:
            log.error("the server refuses this agent (%s): spooling, retrying once a minute", why)
            self.spool.set_meta("blocked", why)
        self.blocked = why
        if self.down_since is None:
            self.down_since = time.time()
        self.last_error = why
        self.backoff_s = BLOCKED_RETRY_S
        self.retry_at = time.monotonic() + BLOCKED_RETRY_S
        self.nonces = []

    def _ok(self) -> None:
        if self.down_since is not None:
            log.warning("server back after %.1f s", time.time() - self.down_since)
        self.down_since = None
        if self.blocked is not None:
            self.spool.set_meta("blocked", "")
            self.blocked = None
        self.backoff_s = 0.0

    def _get_nonces(self, n: int) -> list[str]:
        """``n`` nonces: cached ones still fresh first, then new ones from the server."""
        now = time.time()
        fresh = [x for x in self.nonces if x[1] - 2.0 > now]
        got = [x[0] for x in fresh[:n]]
        self.nonces = fresh[n:]
        try:
            if n - len(got) == 1:
                got.append(self.client.challenge())
            elif n > len(got):
                try:
                    got.extend(self.client.challenges(n - len(got)))
                except (KeyError, TypeError):  # a server without ``count``: one at a time
                    log.warning("the server issues one nonce per challenge: no batches")
                    self.batch_max = 1
                    got.extend(self.client.challenge() for _ in range(n - len(got)))
        except ApiError as e:
            if e.status >= 500 or e.status in RETRY_STATUS:
                raise _RetryError(str(e)) from None
            raise _BlockedError(f"challenge refused: {e}") from None
        return got

    def _keep_nonce(self, answer: dict[str, Any]) -> None:
        nxt = answer.get("next_challenge")
        if isinstance(nxt, dict) and "nonce" in nxt:
            self.nonces.append((str(nxt["nonce"]), float(nxt.get("expires_at", time.time() + 30))))
            del self.nonces[: -self.batch_max]  # the freshest are enough

    def _round(self, limit: int, attempt: int = 0) -> tuple[list[Delivered], str | None]:
        """Send what is in flight, or sign and send the next (up to ``batch_max``)
        observations. Returns what was delivered and, when the server asked to retry later
        after some were delivered, why (otherwise that is raised as :class:`_RetryError`)."""
        rows = self.spool.inflight_all()
        if not rows:
            n = max(1, min(self.batch_max, limit))
            if not self._sign(n):
                return [], None
            rows = self.spool.inflight_all()
        if len(rows) == 1:
            return self._send_one(rows[0], limit, attempt)
        return self._send_batch(rows, limit, attempt)

    def _sign(self, n: int) -> int:
        """Sign the ``n`` oldest observations and commit them in flight; how many."""
        todo = self._signable(n)
        if not todo:
            return 0
        nonces = self._get_nonces(len(todo))
        drops = self.spool.take_unreported_drops()
        prev = self.spool.chain_state()
        signed: list[tuple[int, ChainState, str]] = []
        try:
            for i, ((p, ms, beh), nonce) in enumerate(zip(todo, nonces, strict=True)):
                if i == 0 and drops:  # the first token reports the drops not yet reported
                    ms, beh = _claims(p.payload, drops)
                files = self.builder.files_digest(ms)
                by_ref = files is not None and files in self.server_files
                ev = self.builder.build(nonce, ms, beh, files_by_reference=by_ref)
                new = self.chain.last_saved
                assert new is not None
                assert new.prev == ev.digest
                if files is not None and not by_ref:
                    self._signed_files[new.seq] = files
                else:  # (a number re-used after a rollback)
                    self._signed_files.pop(new.seq, None)
                signed.append((p.id, new, ev.token))
                self.chain.overlay = new  # the next one links to this one
        finally:
            self.chain.overlay = None
        self.spool.commit_signed_many(prev, signed)
        if drops:
            self.spool.clear_unreported_drops(drops)
        return len(signed)

    def _signable(self, n: int) -> list[tuple[Pending, Measurements, BehaviorSummary | None]]:
        """Up to ``n`` oldest observations with their claims. One whose claims are invalid
        (a payload no longer valid for this version's claim models, a damaged row) would
        block the spool for ever: it is dropped, logged and counted (reported to the verifier
        as ``spool_dropped`` in the next token)."""
        while True:
            todo = self.spool.oldest_n(n)
            good = []
            for p in todo:
                try:
                    ms, beh = _claims(p.payload, 0)
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    log.error(
                        "observation %d of %s cannot be signed (%s): dropped",
                        p.id,
                        p.workload,
                        str(e).splitlines()[0][:200],
                    )
                    self.spool.discard(p.id)
                    continue
                good.append((p, ms, beh))
            if good or not todo:
                return good

    def _send_one(
        self, inf: InFlight, limit: int, attempt: int
    ) -> tuple[list[Delivered], str | None]:
        p = self.spool.get(inf.pending_id)
        workload = p.workload if p else ""
        payload = p.payload if p else {}
        try:
            out = self.client.submit(inf.token)
        except ApiError as e:
            if e.reason in RESIGN_REASONS:
                self._not_stored(e.reason)
                # the server did not store it (a stored token answers "duplicate"): re-sign
                log.info("seq %d not accepted (%s): signing it again", inf.seq, e.reason)
                self.spool.rollback_inflight()
                if attempt >= 2:  # e.g. a clock far off: back off rather than spin
                    raise _RetryError(f"nonce refused {attempt + 1} times: {e}") from None
                return self._round(limit, attempt + 1)
            _raise_if_blocked(e)
            if e.status >= 500 or e.status in RETRY_STATUS:
                raise _RetryError(str(e)) from None
            log.error("evidence seq %d refused for good: %s; observation dropped", inf.seq, e)
            self.spool.rollback_inflight(drop_observation=True)
            return [Delivered(workload, inf.seq, False, error=str(e), payload=payload)], None
        return [self._accepted(inf, workload, payload, out)], None

    def _accepted(
        self, inf: InFlight, workload: str, payload: dict[str, Any], out: dict[str, Any]
    ) -> Delivered:
        res = out.get("result", {})
        files = self._signed_files.pop(inf.seq, None)
        if files is not None:
            if len(self.server_files) >= MAX_SERVER_FILES:
                self.server_files.clear()
            self.server_files.add(files)
        self._keep_nonce(out)
        self.spool.delivered(res.get("status"), res.get("action"), seq=inf.seq)
        return Delivered(
            workload,
            inf.seq,
            True,
            status=res.get("status"),
            action=res.get("action"),
            reasons=list(res.get("reasons", [])),
            duplicate=bool(out.get("duplicate")),
            payload=payload,
            sent_at=time.time(),
        )

    def _send_batch(
        self, rows: list[InFlight], limit: int, attempt: int
    ) -> tuple[list[Delivered], str | None]:
        obs = [self.spool.get(r.pending_id) for r in rows]
        try:
            items = self.client.submit_batch([r.token for r in rows])
        except ApiError as e:
            return self._batch_refused(rows, e, limit, attempt)
        if len(items) != len(rows):
            raise _RetryError(f"{len(items)} answers to a batch of {len(rows)}")
        out: list[Delivered] = []
        for i, (inf, item) in enumerate(zip(rows, items, strict=True)):
            p = obs[i]
            workload = p.workload if p else ""
            payload = p.payload if p else {}
            status = int(item.get("status", 0))
            if status == 200:
                out.append(self._accepted(inf, workload, payload, item["evidence"]))
                continue
            err = ApiError(status, str(item.get("reason", "")), str(item.get("message", "")))
            if err.reason in RESIGN_REASONS or err.reason == "batch_aborted":
                self._not_stored(err.reason)
                # not stored, nor anything after it: sign them all again
                log.info(
                    "seq %d..%d not accepted (%s): signing them again",
                    inf.seq,
                    rows[-1].seq,
                    err.reason,
                )
                self.spool.rollback_inflight()
                if out:
                    return out, None  # progress: the next round signs them again
                if attempt >= 2:
                    raise _RetryError(f"nonce refused {attempt + 1} times: {err}")
                return self._round(limit, attempt + 1)
            if out and _blocks(err):
                return out, str(err)  # kept in flight: the next round finds it blocked
            _raise_if_blocked(err)
            if status >= 500 or status in RETRY_STATUS:
                if not out:
                    raise _RetryError(str(err))
                return out, str(err)  # the rest stays in flight: resent verbatim later
            log.error(
                "evidence seq %d refused for good: %s; observation dropped "
                "(the %d after it are signed again)",
                inf.seq,
                err,
                len(rows) - i - 1,
            )
            self.spool.rollback_inflight(drop_observation=True)
            out.append(Delivered(workload, inf.seq, False, error=str(err), payload=payload))
            return out, None
        return out, None

    def _batch_refused(
        self, rows: list[InFlight], e: ApiError, limit: int, attempt: int
    ) -> tuple[list[Delivered], str | None]:
        """The whole batch request was refused: nothing of it was stored."""
        if e.status >= 500 or e.status in RETRY_STATUS:
            raise _RetryError(str(e)) from None
        _raise_if_blocked(e)  # e.g. the first token does not authenticate the agent
        if e.status == 413:
            self.batch_max = max(1, len(rows) // 2)
            log.warning("a batch of %d is too large: now at most %d", len(rows), self.batch_max)
        elif e.reason not in RESIGN_REASONS:
            self.batch_max = 1
            log.warning("batch refused (%s): sending one token at a time", e)
        self._not_stored(e.reason)
        self.spool.rollback_inflight()
        if attempt >= 2:
            raise _RetryError(f"batch refused {attempt + 1} times: {e}") from None
        return self._round(limit, attempt + 1)

    def _not_stored(self, reason: str) -> None:
        """Tokens in flight were not stored (they are signed again): forget their lists and,
        when the server lacks a list it was thought to hold, every list."""
        self._signed_files.clear()
        if reason == FILES_UNKNOWN:
            log.info("the server does not hold a measured file list: sending lists in full")
            self.server_files.clear()


def _claims(payload: dict[str, Any], drops: int) -> tuple[Measurements, BehaviorSummary | None]:
    """An observation's claims (``drops``: spool drops to report in its top features)."""
    behavior_json = dict(payload["behavior"]) if payload.get("behavior") else None
    if drops and behavior_json is not None:
        feats = list(behavior_json.get("top_features", []))
        behavior_json["top_features"] = [*feats, f"spool_dropped={drops}"]
    ms = Measurements.model_validate_json(json.dumps(payload["measurements"]))
    beh = (
        BehaviorSummary.model_validate_json(json.dumps(behavior_json))
        if behavior_json is not None
        else None
    )
    return ms, beh


class _RetryError(Exception):
    """A transient server-side refusal: keep the token and try again later."""


class _BlockedError(_RetryError):
    """The server refuses the agent itself until an operator acts: keep everything."""


def _blocks(e: ApiError) -> bool:
    """Whether ``e`` refuses the agent itself (see the module docstring), not one token."""
    return e.reason in CHAIN_DIVERGED or (
        e.status in AGENT_REFUSED and e.reason not in NONCE_REASONS
    )


def _raise_if_blocked(e: ApiError) -> None:
    if not _blocks(e):
        return
    if e.reason in CHAIN_DIVERGED:
        raise _BlockedError(
            f"{e}. The agent's chain no longer links to the server's (a wiped or restored "
            "spool?): after checking why, run `bam server reset-chain AGENT` on the server"
        ) from None
    raise _BlockedError(str(e)) from None
