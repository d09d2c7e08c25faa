"""Deliver spooled observations in order: challenge → sign → store in flight → send.

See :mod:`bam.agent.spool` for why observations are signed at delivery time and how a crash
between signing and the server's answer is resolved without a chain gap. Transport failures
and server-side overload (5xx, 429, 409 conflict) leave everything in place and back off
(0.25 s doubling to 5 s); a token refused for good (a 4xx that retrying cannot change) is
logged, its observation dropped and the chain rolled back so later tokens still link.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bam.agent.spool import Spool, SpoolChain
from bam.evidence.claims import BehaviorSummary, Measurements
from bam.evidence.token import EvidenceBuilder
from bam.server.client import AgentClient, ApiError

log = logging.getLogger("bam.agent")

NONCE_REASONS = frozenset({"nonce_expired", "nonce_unknown", "nonce_used", "nonce_stale"})
RETRY_STATUS = frozenset({408, 409, 425, 429})


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

    def __init__(self, spool: Spool, client: AgentClient, builder: EvidenceBuilder) -> None:
        if not isinstance(builder.chain, SpoolChain):
            raise TypeError("the builder must sign with the spool's chain (SpoolChain)")
        self.spool = spool
        self.client = client
        self.builder = builder
        self.chain: SpoolChain = builder.chain
        self.nonce: tuple[str, float] | None = None
        self.backoff_s = 0.0
        self.retry_at = 0.0
        self.down_since: float | None = None
        self.last_error: str | None = None

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
                d = self._one()
            except (httpx.TransportError, _RetryError) as e:
                self._failed(str(e) or type(e).__name__)
                break
            if d is None:
                break
            self._ok()
            out.append(d)
        return out

    def _failed(self, why: str) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            log.warning("server unreachable (%s): spooling", why)
        self.last_error = why
        self.backoff_s = min(5.0, max(0.25, self.backoff_s * 2))
        self.retry_at = time.monotonic() + self.backoff_s
        self.nonce = None

    def _ok(self) -> None:
        if self.down_since is not None:
            log.warning("server back after %.1f s", time.time() - self.down_since)
        self.down_since = None
        self.backoff_s = 0.0

    def _get_nonce(self) -> str:
        if self.nonce is not None and self.nonce[1] - 2.0 > time.time():
            n = self.nonce[0]
            self.nonce = None
            return n
        self.nonce = None
        try:
            return self.client.challenge()
        except ApiError as e:
            if e.status >= 500 or e.status in RETRY_STATUS:
                raise _RetryError(str(e)) from None
            raise

    def _one(self, attempt: int = 0) -> Delivered | None:
        inf = self.spool.inflight()
        if inf is not None:
            return self._send_inflight(attempt)
        p = self.spool.oldest()
        if p is None:
            return None
        nonce = self._get_nonce()
        payload = p.payload
        behavior_json = dict(payload["behavior"]) if payload.get("behavior") else None
        drops = self.spool.take_unreported_drops()
        if drops and behavior_json is not None:
            feats = list(behavior_json.get("top_features", []))
            behavior_json["top_features"] = [*feats, f"spool_dropped={drops}"]
        ms = Measurements.model_validate_json(json.dumps(payload["measurements"]))
        beh = (
            BehaviorSummary.model_validate_json(json.dumps(behavior_json))
            if behavior_json is not None
            else None
        )
        prev = self.spool.chain_state()
        ev = self.builder.build(nonce, ms, beh)
        new = self.chain.last_saved
        assert new is not None
        assert new.prev == ev.digest
        self.spool.commit_signed(p.id, prev, new, ev.token)
        if drops:
            self.spool.clear_unreported_drops(drops)
        return self._send_inflight(attempt)

    def _send_inflight(self, attempt: int = 0) -> Delivered | None:
        inf = self.spool.inflight()
        if inf is None:
            return None
        p = self.spool.get(inf.pending_id)
        workload = p.workload if p else ""
        payload = p.payload if p else {}
        try:
            out = self.client.submit(inf.token)
        except ApiError as e:
            if e.reason in NONCE_REASONS:
                # the server did not store it (a stored token answers "duplicate"): re-sign
                log.info("seq %d not accepted (%s): signing it again", inf.seq, e.reason)
                self.spool.rollback_inflight()
                if attempt >= 2:  # e.g. a clock far off: back off rather than spin
                    raise _RetryError(f"nonce refused {attempt + 1} times: {e}") from None
                return self._one(attempt + 1)
            if e.status >= 500 or e.status in RETRY_STATUS:
                raise _RetryError(str(e)) from None
            log.error("evidence seq %d refused for good: %s; observation dropped", inf.seq, e)
            self.spool.rollback_inflight(drop_observation=True)
            return Delivered(workload, inf.seq, False, error=str(e), payload=payload)
        res = out.get("result", {})
        nxt = out.get("next_challenge")
        if isinstance(nxt, dict) and "nonce" in nxt:
            self.nonce = (str(nxt["nonce"]), float(nxt.get("expires_at", time.time() + 30)))
        self.spool.delivered(res.get("status"), res.get("action"))
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


class _RetryError(Exception):
    """A transient server-side refusal: keep the token and try again later."""
