"""Evidence: challenges, then verify, appraise and store one EAT (the path agents use most).

Rules it keeps:

* **Verify before storing.** Only the JOSE header is read before the signature verifies;
  :func:`bam.evidence.verify.verify_token` then checks the signature, claims, chain and TPM
  quote completely before anything is written.
* **One transaction per evidence.** The nonce, the chain update and every row of the appraisal
  are written together, so a failure anywhere leaves nothing behind and a crash never leaves
  half an appraisal.
* **No replica-local truth.** Single use of nonces, chain order and workload state changes are
  conditional UPDATEs (compare-and-set) and unique constraints, which hold across replicas; a
  lost race is retried or answered as what it is (a duplicate, a replay).
* **Short write transactions.** Policy evaluation and EAR signing happen before the write
  transaction, against a snapshot of the workload; the transaction re-checks that snapshot.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Connection, RowMapping, insert, select, update
from starlette.concurrency import run_in_threadpool

from bam.evidence.canonical import b64url_decode, sha256_hex, strict_json_object
from bam.evidence.claims import EvidenceClaims, FileMeasurement
from bam.evidence.errors import VerificationError
from bam.evidence.keys.base import VerificationKey
from bam.evidence.nonces import new_nonce
from bam.evidence.quote import ClockInfo
from bam.evidence.verify import VerifiedEvidence, verify_token
from bam.server import ratelimit
from bam.server.db import hot
from bam.server.db.groupcommit import CommitFailedError
from bam.server.ear import sign_ear
from bam.server.errors import ChainDivergedError, ServerError
from bam.server.service.appraisal import (
    AppraisalMixin,
    RetryError,
    action_audit,
    next_hold,
    result_dict,
    workload_input,
)
from bam.server.service.core import A, E, N, R, dumps, nonce_hash
from bam.server.service.file_sets import Files, FileSetsMixin
from bam.server.service.intel import IntelMixin
from bam.server.service.queries import QueriesMixin, result_out

MAX_NONCES = 64
"""Nonces per challenge request (as tokens per batch)."""

# Verification failures and the HTTP status they answer with.
_UNAUTHENTICATED = {"unknown_key", "bad_signature", "alg_key_mismatch", "ueid_mismatch"}
_CONFLICT = {"seq_replay", "nonce_reused", "nonce_used"}
# Refusals only an operator can end (bam server reset-chain): remembered on the agent.
CHAIN_DIVERGED = frozenset({"seq_replay", "chain_broken"})
_INS_NONCE = insert(N)


def _status_for(reason: str) -> int:
    if reason in _UNAUTHENTICATED:
        return 401
    if reason in _CONFLICT:
        return 409
    return 422


@dataclass(frozen=True)
class EvidenceOutcome:
    """What ``POST /v1/evidence`` answers: the stored evidence, its result, the next nonce."""

    evidence_id: int
    digest: str
    seq: int
    duplicate: bool
    result: dict[str, Any]
    next_nonce: tuple[str, float] | None


@dataclass
class _Write:
    """One evidence's write transaction: its statement parameters and the checks around them."""

    params: dict[str, Any]
    agent_id: str
    limit: int
    now: float
    not_before: float
    """``iat`` + clock skew: the nonce must have been issued before this."""
    action_changed: bool
    audit_detail: Callable[[int], str]
    audit_actor: str
    workload: str
    outcome: Callable[[tuple[int, int]], EvidenceOutcome]
    """The answer, from ``(evidence_id, result_id)`` once the write has committed."""
    new_files: tuple[str, Files] | None = None
    """A measured file list this write stores (digest, files)."""


@dataclass
class _Carry:
    """State that earlier tokens of a batch will write, for the tokens after them.

    A batch is appraised before any of it is written, so the stored chain head and workload
    rows are one or more tokens behind; this overlays what the pending writes will set. The
    write transaction still re-checks everything (compare-and-set on ``last_seq`` and
    ``version``), so a wrong overlay can only make a write fail, never store a broken chain.
    """

    agent: dict[str, Any] = field(default_factory=dict)
    workloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, Files] = field(default_factory=dict)

    def advance(self, w: _Write) -> None:
        """Overlay what ``w`` writes: the agent's chain head and its workload's row."""
        p = w.params
        self.agent = {
            "last_seq": p["seq"],
            "last_digest": p["digest"],
            "last_nonce": p["nonce"],
            "tpm_clock": p["tpm_clock"],
            "tpm_reset": p["tpm_reset"],
            "tpm_restart": p["tpm_restart"],
            "tpm_safe": p["tpm_safe"],
            "tpm_ak": p["tpm_ak"],
        }
        self.workloads[w.workload] = {
            "status": p["status"],
            "action": p["action"],
            "severity": p["severity"],
            "hold": bool(p["hold"]),
            "hold_since": p["hold_since"],
            "hold_action": p["hold_action"],
            "stale": False,
            "version": p["old"] + 1,
        }
        if w.new_files is not None:
            self.files[w.new_files[0]] = w.new_files[1]


class EvidenceMixin(AppraisalMixin, QueriesMixin, IntelMixin, FileSetsMixin):
    """Challenges and evidence."""

    def _insert_nonce(self, conn: Connection, agent_id: str, now: float) -> tuple[str, float]:
        nonce = new_nonce(32)
        expires = now + self.settings.nonce_ttl_s
        conn.execute(
            _INS_NONCE,
            {
                "nonce_hash": nonce_hash(nonce),
                "agent_id": agent_id,
                "issued_at": now,
                "expires_at": expires,
            },
        )
        return nonce, expires

    def challenge(self, agent: RowMapping, count: int = 1) -> list[tuple[str, float]]:
        """``count`` fresh single-use nonces bound to ``agent`` (expire in ``nonce_ttl_s``).

        More than one is for a batch of tokens (one nonce each); the request counts once
        against the agent's rate limit, each evidence then counts on its own.
        """
        if not 1 <= count <= MAX_NONCES:
            raise ServerError(422, "request_invalid", f"count: must be 1 to {MAX_NONCES}")
        now = time.time()
        with self.write() as conn:
            ratelimit.hit(conn, agent["id"], self.settings.agent_requests_per_minute, now)
            return [self._insert_nonce(conn, agent["id"], now) for _ in range(count)]

    def submit_evidence(self, token: str) -> EvidenceOutcome:
        """Verify, appraise and store one evidence token (see the module docstring).

        Blocking: for worker threads, the CLI and tests. Reads run on one pooled connection
        with the plain statements of :mod:`bam.server.db.hot`; the write goes to the group
        committer (SQLite) or runs on the same connection (PostgreSQL).
        """
        text, digest, kid = _parse(token)
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            for _attempt in range(_ATTEMPTS):
                try:
                    prepared = self._prepare(cur, text, digest, kid)
                except ChainDivergedError as e:
                    raw.rollback()
                    self.note_refusal(e)
                    raise
                if isinstance(prepared, EvidenceOutcome):
                    return prepared
                try:
                    return prepared.outcome(self._store_evidence(raw, cur, prepared))
                except RetryError:
                    raw.rollback()
            raise _conflict()
        finally:
            try:
                raw.rollback()  # no-op after a commit; undoes anything left on an error
            finally:
                raw.close()

    async def submit_evidence_async(self, token: str) -> EvidenceOutcome:
        """:meth:`submit_evidence` for the event loop.

        On SQLite everything runs right here on the loop's thread: the CPU-bound part
        (verification, policy, EAR) and the two reads — reads in WAL mode never wait for a
        writer — and the write, queued to the loop's group committer and awaited
        (:mod:`bam.server.db.groupcommit`). No thread switch, no GIL hand-over, and the writes
        of requests that arrived together share one COMMIT. On PostgreSQL, where every
        statement is a network round trip, the blocking version runs on a worker thread.
        """
        db = self._loop_db()
        if db is None:
            return await run_in_threadpool(self.submit_evidence, token)
        text, digest, kid = _parse(token)
        for _attempt in range(_ATTEMPTS):
            try:
                prepared = self._prepare(db.cursor, text, digest, kid)
            except ChainDivergedError as e:
                await run_in_threadpool(self.note_refusal, e)
                raise
            if isinstance(prepared, EvidenceOutcome):
                return prepared
            try:
                ids = await db.committer.run(functools.partial(self._write_sqlite, prepared))
            except RetryError:
                continue
            except CommitFailedError as e:
                raise ServerError(503, "store_unavailable", f"{e}; retry") from None
            return prepared.outcome(ids)
        raise _conflict()

    def _prepare(
        self, cur: Any, text: str, digest: str, kid: str, carry: _Carry | None = None
    ) -> EvidenceOutcome | _Write:
        """Everything before the write: reads, verification, policy, the signed EAR.

        Returns the stored outcome for a retry of a token already accepted (a duplicate), or
        the write to perform. ``carry``: what earlier, not yet written tokens of the same
        batch will have changed.
        """
        limit = self.settings.agent_requests_per_minute
        now = time.time()
        row = hot.one(
            cur, self._hot.agent, {"kid": kid, "digest": digest, "window": ratelimit.window(now)}
        )
        if row is None:
            raise ServerError(401, "unknown_agent", f"no agent is enrolled with key {kid[:64]!r}")
        agent = dict(zip(hot.AGENT_COLUMNS, row, strict=False))
        if agent["revoked_at"] is not None:
            raise ServerError(403, "agent_revoked", f"agent {agent['name']!r} is revoked")
        dup_id, used = row[-2], row[-1]
        if dup_id is not None:
            dup = self._duplicate_by_id(dup_id, digest)
            if dup is not None:
                return dup
        if used is not None and used >= limit:
            raise ratelimit.limited(agent["id"], limit, now)
        if carry is not None:
            agent.update(carry.agent)
        try:
            return self._appraise_evidence(cur, text, digest, agent, self._vk(agent["jwk"]), carry)
        except ServerError as e:
            if e.reason in CHAIN_DIVERGED:
                raise ChainDivergedError(e, agent["id"]) from None
            raise

    def note_refusal(self, error: ChainDivergedError) -> None:
        """Remember on the agent that its chain diverged (its next accepted token clears it).

        A write on a refusal, but only after the token's signature verified: an agent can
        only mark itself, at most once per request its rate limit allows."""
        with self.write() as conn:
            conn.execute(
                update(A)
                .where(A.c.id == error.agent_id)
                .values(refused_reason=error.reason, refused_at=time.time())
            )

    def _duplicate_by_id(self, evidence_id: int, digest: str) -> EvidenceOutcome | None:
        with self.read() as conn:
            ev = conn.execute(select(E.c.id, E.c.seq).where(E.c.id == evidence_id)).first()
            if ev is None:
                return None
            res = (
                conn.execute(self._result_query().where(R.c.evidence_id == ev.id))
                .mappings()
                .first()
            )
        if res is None:  # cannot happen: evidence and result commit together
            return None
        return EvidenceOutcome(ev.id, digest, ev.seq, True, result_out(res), None)

    def _previous(self, agent: Mapping[str, Any], vk: VerificationKey) -> VerifiedEvidence | None:
        """The chain state of ``agent`` as the evidence layer's "previous token"."""
        if agent["last_seq"] == 0:
            return None
        return _bridge(
            vk,
            seq=agent["last_seq"],
            digest=agent["last_digest"],
            nonce=agent["last_nonce"] or "-",
            tpm_clock=_clock(agent),
            ak=agent["tpm_ak"],
        )

    def _verify(
        self, text: str, agent: Mapping[str, Any], vk: VerificationKey, now: float
    ) -> tuple[VerifiedEvidence, int]:
        """Verify completely; a sequence gap is accepted and reported (policy decides)."""
        previous = self._previous(agent, vk)
        trusted_aks = [agent["ak_kid"]] if agent["ak_kid"] else None
        kwargs: dict[str, Any] = {
            "require_tpm": agent["ak_kid"] is not None,
            "trusted_aks": trusted_aks,
            "max_age_s": self.settings.nonce_ttl_s + self.settings.clock_skew_s,
            "clock_skew_s": self.settings.clock_skew_s,
            "now": now,
        }
        try:
            verified = verify_token(text, vk, previous=previous, **kwargs)
        except VerificationError as e:
            if e.reason != "seq_gap" or previous is None:
                raise ServerError(_status_for(e.reason), e.reason, e.message) from None
            # The signature verified (seq_gap is checked after it): bridge the gap so that
            # every other check, TPM monotonicity included, still runs against the last token.
            claims = EvidenceClaims.model_validate_json(b64url_decode(text.split(".")[1]))
            bridge = replace(
                previous,
                digest=claims.bam_prev,
                claims=EvidenceClaims.model_construct(
                    ueid=vk.ueid, bam_seq=claims.bam_seq - 1, eat_nonce=previous.claims.eat_nonce
                ),
            )
            try:
                verified = verify_token(text, vk, previous=bridge, **kwargs)
            except VerificationError as e2:
                raise ServerError(_status_for(e2.reason), e2.reason, e2.message) from None
            return verified, claims.bam_seq - agent["last_seq"] - 1
        seq = verified.claims.bam_seq
        missing = seq - 1 if previous is None and seq > 1 else 0
        return verified, missing

    def _appraise_evidence(
        self,
        cur: Any,
        text: str,
        digest: str,
        agent: dict[str, Any],
        vk: VerificationKey,
        carry: _Carry | None = None,
    ) -> _Write:
        now = time.time()
        verified, missing = self._verify(text, agent, vk, now)
        claims = verified.claims
        target = claims.submods.measurements.target
        nonce_h = nonce_hash(claims.eat_nonce)
        row = hot.one(cur, self._hot.workload, {"h": nonce_h, "name": target.name})
        if row is None or row[2] != agent["id"]:
            raise ServerError(
                422,
                "workload_unknown",
                f"workload {target.name!r} is not registered for this agent",
            )
        wl = dict(zip(hot.WORKLOAD_COLUMNS, row, strict=False))
        wl["hold"], wl["stale"] = bool(wl["hold"]), bool(wl["stale"])
        if carry is not None:
            wl.update(carry.workloads.get(wl["name"], {}))
        n = len(hot.WORKLOAD_COLUMNS)
        nonce_row = (
            None
            if row[n] is None
            else {"agent_id": row[n], "used_at": row[n + 1], "expires_at": row[n + 2]}
        )
        _check_nonce(nonce_row, agent["id"], now)  # early, cheap rejection; re-checked below
        ms = claims.submods.measurements
        files, files_json = self._resolve_files(cur, ms, carry.files if carry else {})

        document = self._evidence_input(agent, wl, verified, missing, files)
        appraisal, decision = self._decide(wl, document, now)
        appraisal = replace(
            appraisal, nonce=claims.eat_nonce, evidence_digest=digest, seq=claims.bam_seq
        )
        ear = sign_ear(appraisal, self.signer, now)
        behavior = claims.submods.behavior
        score = _score(behavior.scores, behavior.thresholds) if behavior is not None else None
        tpm = verified.tpm_clock
        hold, hold_since, hold_action = next_hold(wl, appraisal, decision, now)
        next_nonce = new_nonce(32)
        next_expires = now + self.settings.nonce_ttl_s
        reasons_json = dumps(list(appraisal.reasons))
        params: dict[str, Any] = {
            # claim: rate limit, nonce, chain
            "agent": agent["id"],
            "window": ratelimit.window(now),
            "h": nonce_h,
            "now": now,
            "old_seq": agent["last_seq"],
            "epoch": agent["chain_epoch"],
            "seq": claims.bam_seq,
            "digest": digest,
            "nonce": claims.eat_nonce,
            "tpm_clock": tpm.clock if tpm else None,
            "tpm_reset": tpm.reset_count if tpm else None,
            "tpm_restart": tpm.restart_count if tpm else None,
            "tpm_safe": tpm.safe if tpm else None,
            "tpm_ak": verified.ak_thumbprint,
            # store: evidence, result, workload, next nonce
            "wid": wl["id"],
            "iat": claims.iat,
            "severity": behavior.severity if behavior else None,
            "label": behavior.label if behavior else None,
            "score": score,
            "window_end": behavior.window_end if behavior else None,
            "token": text,
            "trigger": appraisal.trigger,
            "status": appraisal.status,
            "action": appraisal.action,
            "reasons": reasons_json,
            "policy_id": appraisal.policy_id,
            "policy_version": appraisal.policy_version,
            "ear": ear,
            "hold": hold,
            "hold_since": hold_since,
            "hold_action": hold_action,
            "stale": False,
            "old": wl["version"],
            "next_h": nonce_hash(next_nonce),
            "next_expires": next_expires,
            "files_sha256": ms.files_sha256,
            "files_json": files_json,
        }
        fsha = ms.files_sha256
        new_files = (fsha, files) if files_json is not None and fsha is not None else None

        def outcome(ids: tuple[int, int]) -> EvidenceOutcome:
            if new_files is not None:  # committed: this process knows it is stored
                self._remember_files(*new_files)
            return EvidenceOutcome(
                ids[0],
                digest,
                claims.bam_seq,
                False,
                result_dict(appraisal, ids[1], ids[0], ear, now),
                (next_nonce, next_expires),
            )

        contra = appraisal.status == "contraindicated"
        return _Write(
            params=params,
            agent_id=agent["id"],
            limit=self.settings.agent_requests_per_minute,
            now=now,
            not_before=claims.iat + self.settings.clock_skew_s,
            action_changed=appraisal.action != wl["action"] or (contra and not wl["hold"]),
            audit_detail=lambda result_id: dumps(
                action_audit(appraisal, wl["action"], result_id, f"agent:{agent['id']}")
            ),
            audit_actor=f"policy:{appraisal.policy_id}"[:160],
            workload=wl["name"],
            outcome=outcome,
            new_files=new_files,
        )

    def _store_evidence(self, raw: Any, cur: Any, w: _Write) -> tuple[int, int]:
        """Run the write transaction on this connection; ``(evidence_id, result_id)``.

        The blocking path (worker threads, CLI, tests): one transaction per evidence. On
        PostgreSQL two statements, then COMMIT (the server groups concurrent commits itself);
        on SQLite ``BEGIN IMMEDIATE`` and the plain statements.
        """
        if self._hot.postgresql:
            ids = self._write_postgresql(cur, w)
        else:
            cur.execute("BEGIN IMMEDIATE")
            ids = self._write_sqlite(w, cur)
        raw.commit()
        return ids

    def _write_sqlite(self, w: _Write, cur: Any) -> tuple[int, int]:
        """The statements of one evidence, in the caller's transaction (see db.hot)."""
        st, params = self._hot, w.params
        count = hot.one(cur, st.rate_hit, params)[0]  # type: ignore[index]
        if count > w.limit:
            raise ratelimit.limited(w.agent_id, w.limit, w.now)
        used = hot.one(cur, st.use_nonce, params)
        if used is None:
            _check_nonce(_nonce_dict(hot.one(cur, st.nonce, params)), w.agent_id, w.now)
            raise ServerError(409, "nonce_used", "the nonce was already used")
        if w.not_before < used[0]:
            raise ServerError(422, "nonce_stale", "token was issued before its nonce")
        cur.execute(st.move_chain, params)
        if cur.rowcount != 1:
            raise RetryError
        if params["files_json"] is not None:
            cur.execute(st.insert_files, params)
        evidence_id = hot.one(cur, st.insert_evidence, params)[0]  # type: ignore[index]
        params["evidence_id"] = evidence_id
        result_id = hot.one(cur, st.insert_result, params)[0]  # type: ignore[index]
        params["result_id"] = result_id
        cur.execute(st.move_workload, params)
        if cur.rowcount != 1:
            raise RetryError
        cur.execute(st.insert_nonce, params)
        self._write_action(cur, w, result_id)
        return int(evidence_id), int(result_id)

    def _write_postgresql(self, cur: Any, w: _Write) -> tuple[int, int]:
        """The same writes as two data-modifying CTE statements (one round trip each)."""
        st, params = self._hot, w.params
        count, issued_at, moved = hot.one(cur, st.pg_claim, params) or (None, None, 0)
        if count is None or count > w.limit:
            raise ratelimit.limited(w.agent_id, w.limit, w.now)
        if issued_at is None:
            _check_nonce(_nonce_dict(hot.one(cur, st.nonce, params)), w.agent_id, w.now)
            raise ServerError(409, "nonce_used", "the nonce was already used")
        if w.not_before < issued_at:
            raise ServerError(422, "nonce_stale", "token was issued before its nonce")
        if moved != 1:
            raise RetryError
        if params["files_json"] is not None:  # rare: a list given in full, not yet stored
            cur.execute(st.insert_files, params)
        evidence_id, result_id, moved = hot.one(cur, st.pg_store, params) or (None, None, 0)
        if moved != 1:
            raise RetryError
        self._write_action(cur, w, result_id)
        return int(evidence_id), int(result_id)

    def _write_action(self, cur: Any, w: _Write, result_id: int) -> None:
        """An action row and its audit row, when the workload's action changes."""
        if not w.action_changed:
            return
        st = self._hot
        cur.execute(st.insert_action, {**w.params, "result_id": result_id, "state": "pending"})
        cur.execute(
            st.insert_audit,
            {
                "now": w.now,
                "actor": w.audit_actor,
                "event": "action",
                "workload": w.workload,
                "detail": w.audit_detail(result_id),
            },
        )

    def _evidence_input(
        self,
        agent: Mapping[str, Any],
        wl: Mapping[str, Any],
        verified: VerifiedEvidence,
        missing: int,
        files: Sequence[FileMeasurement],
    ) -> dict[str, Any]:
        """The policy input for one verified token (kept small: set_input cost grows with it).

        ``files``: the token's measured files (resolved, when it gave them by reference)."""
        claims = verified.claims
        ms = claims.submods.measurements
        ref: dict[str, str] = json.loads(wl["reference"])["files"] if wl["reference"] else {}
        mismatches = [
            {"path": f.path, "role": f.role}
            for f in files
            if f.path in ref and ref[f.path] != f.sha256
        ]
        unknown = sum(1 for f in files if ref and f.path not in ref)
        b = claims.submods.behavior
        behavior = None
        if b is not None:
            behavior = {
                "severity": b.severity,
                "label": b.label,
                "probability": b.probability,
                "baseline_id": b.baseline_id,
                "scores": dict(b.scores),
                "thresholds": dict(b.thresholds),
                "top_features": list(b.top_features),
                "counts": b.counts.model_dump(),
            }
        return {
            "trigger": "evidence",
            "agent": {"id": agent["id"], "name": agent["name"], "tpm": agent["ak_kid"] is not None},
            "workload": workload_input(wl, stale=False),
            "evidence": {
                "seq": claims.bam_seq,
                "iat": claims.iat,
                "tpm": claims.submods.tpm is not None,
                "chain_gap": missing > 0,
                "chain_missing": missing,
                # the first token after an operator reset the chain (it links to nothing)
                "chain_reset": agent["last_seq"] == 0 and agent["chain_epoch"] > 0,
            },
            "measurements": {
                "reference": bool(ref),
                "mismatches": mismatches,
                "unknown": unknown,
                "deleted": [f.path for f in files if f.deleted],
                "anon_exec_mappings": ms.anon_exec_mappings,
            },
            "intel": {
                "matches": self.intel_matches(
                    ((f.path, f.role, f.sha256) for f in files), time.time()
                )
            },
            "behavior": behavior,
        }


# ---- helpers ---------------------------------------------------------------------------------

_ATTEMPTS = 5


def _conflict() -> ServerError:
    return ServerError(409, "conflict", "concurrent updates kept conflicting; retry")


def _parse(token: str) -> tuple[str, str, str]:
    """``(text, sha256, kid)`` of a compact JWS, from its header only (nothing deeper yet)."""
    text = token.strip()
    if not text.isascii():
        raise ServerError(422, "malformed", "token is not ASCII")
    return text, sha256_hex(text.encode("ascii")), _header_kid(text)


def _header_kid(text: str) -> str:
    """The ``kid`` of a compact JWS, from its header only (nothing deeper before verifying)."""
    head, sep, _ = text.partition(".")
    if not sep or len(head) > 2048:
        raise ServerError(422, "malformed", "token is not a compact JWS")
    try:
        header = strict_json_object(b64url_decode(head, "header"), "header")
    except VerificationError as e:
        raise ServerError(422, e.reason, e.message) from None
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 64:
        raise ServerError(422, "header_invalid", "kid is missing or not a key thumbprint")
    return kid


def _nonce_dict(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    return None if row is None else {"agent_id": row[0], "used_at": row[1], "expires_at": row[2]}


def _check_nonce(row: Mapping[str, Any] | None, agent_id: str, now: float) -> None:
    if row is None or row["agent_id"] != agent_id:
        raise ServerError(422, "nonce_unknown", "the nonce was not issued to this agent")
    if row["used_at"] is not None:
        raise ServerError(409, "nonce_used", "the nonce was already used (replay)")
    if row["expires_at"] < now:
        raise ServerError(422, "nonce_expired", "the nonce expired before the evidence arrived")


def _clock(agent: Mapping[str, Any]) -> ClockInfo | None:
    if agent["tpm_clock"] is None:
        return None
    return ClockInfo(
        clock=agent["tpm_clock"],
        reset_count=agent["tpm_reset"],
        restart_count=agent["tpm_restart"],
        safe=bool(agent["tpm_safe"]),
    )


def _bridge(
    vk: VerificationKey,
    *,
    seq: int,
    digest: str,
    nonce: str,
    tpm_clock: ClockInfo | None,
    ak: str | None,
) -> VerifiedEvidence:
    """A stand-in for the previous token, built from the stored chain state.

    The chain checks read only ``claims.ueid``, ``claims.bam_seq``, ``claims.eat_nonce``,
    ``digest``, ``tpm_clock`` and ``ak_thumbprint``; storing those (not the whole token) and
    skipping a second signature check is what keeps an appraisal cheap.
    """
    claims = EvidenceClaims.model_construct(ueid=vk.ueid, bam_seq=seq, eat_nonce=nonce)
    return VerifiedEvidence(
        token="",
        digest=digest,
        header={},
        payload_bytes=b"{}",
        claims=claims,
        kid=vk.kid,
        tpm_clock=tpm_clock,
        ak_thumbprint=ak,
    )


def _score(scores: dict[str, float], thresholds: dict[str, float]) -> float | None:
    """Largest score/threshold ratio (1.0 = at its threshold): one number for the timeline."""
    ratios = [s / thresholds[k] for k, s in scores.items() if thresholds.get(k, 0) > 0]
    if ratios:
        return max(ratios)
    return max(scores.values()) if scores else None
