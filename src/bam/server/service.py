"""The appraisal pipeline and every state change, independent of HTTP.

One :class:`Service` per process wraps the database engine, the server key and the settings;
the FastAPI routes, the CLI and the tests call it. Rules it keeps:

* **Verify before storing.** Evidence is verified completely (signature, claims, chain, TPM
  quote) by :func:`bam.evidence.verify.verify_token` before any write; the nonce, the chain
  update and every row of the appraisal are then written in **one** transaction, so a failure
  anywhere leaves nothing behind and a crash never leaves half an appraisal.
* **No replica-local truth.** Single use of nonces, chain order and workload state changes are
  conditional UPDATEs (compare-and-set) and unique constraints, which hold across replicas;
  a lost race is retried or answered as what it is (a duplicate, a replay).
* **Short write transactions.** Policy evaluation and EAR signing happen before the write
  transaction, against a snapshot of the workload; the transaction re-checks that snapshot
  (its ``version``) and appraises again if it moved. With SQLite, whose writers queue on one
  lock, this is what keeps throughput up.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    Connection,
    Engine,
    RowMapping,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from bam.evidence.canonical import b64url_decode, sha256_hex, strict_json_object
from bam.evidence.claims import EvidenceClaims
from bam.evidence.errors import KeyStoreError, VerificationError
from bam.evidence.keys.base import VerificationKey
from bam.evidence.keys.software import SoftwareSigner
from bam.evidence.nonces import new_nonce
from bam.evidence.quote import ClockInfo
from bam.evidence.verify import VerifiedEvidence, verify_token
from bam.server import ratelimit
from bam.server.auth import (
    ENROL_PREFIX,
    OPERATOR_PREFIX,
    ROLES,
    Operator,
    enrol_message,
    new_secret_token,
    parse_signature_header,
    request_message,
    token_hash,
    verify_raw_signature,
)
from bam.server.db import hot
from bam.server.db import models as m
from bam.server.db.engine import make_engine, migrate
from bam.server.ear import Appraisal, sign_ear
from bam.server.errors import PolicyError, ServerError
from bam.server.keys import load_server_signer
from bam.server.policy import (
    ACTION_RANK,
    DEFAULT_NAME,
    Decision,
    PolicyVersion,
    default_source,
    evaluate,
    validate,
)
from bam.server.settings import ServerSettings

log = logging.getLogger("bam.server")

A, T, W, N, E, R, AC, AU, P, S, OT = (
    m.table(model)
    for model in (
        m.Agent,
        m.EnrolToken,
        m.Workload,
        m.Nonce,
        m.Evidence,
        m.Result,
        m.Action,
        m.Audit,
        m.Policy,
        m.Secret,
        m.OperatorToken,
    )
)

# Verification failures and the HTTP status they answer with.
_UNAUTHENTICATED = {"unknown_key", "bad_signature", "alg_key_mismatch", "ueid_mismatch"}
_CONFLICT = {"seq_replay", "nonce_reused", "nonce_used"}


# Hot-path statements, built once: executing a prebuilt statement with a parameter dict skips
# SQLAlchemy's per-call construction and cache-key work (most of its cost per statement).
_SEL_AGENT_BY_KID = select(A).where(A.c.kid == bindparam("kid"))
_INS_NONCE = insert(N)
_INS_RESULT = insert(R).returning(R.c.id)
_INS_ACTION = insert(AC)
_INS_AUDIT = insert(AU)


def _status_for(reason: str) -> int:
    if reason in _UNAUTHENTICATED:
        return 401
    if reason in _CONFLICT:
        return 409
    return 422


def _hold_reason(since: float) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    return f"held: contraindicated since {when}, awaiting operator acknowledgement"


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class _RetryError(Exception):
    """A compare-and-set lost a race; appraise again from fresh state."""


@dataclass(frozen=True)
class EvidenceOutcome:
    evidence_id: int
    digest: str
    seq: int
    duplicate: bool
    result: dict[str, Any]
    next_nonce: tuple[str, float] | None


class Service:
    """Everything the server does, over one database."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        engine: Engine | None = None,
        signer: SoftwareSigner | None = None,
        run_migrations: bool = True,
    ) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings.url, synchronous=settings.sqlite_synchronous)
        if run_migrations:
            migrate(self.engine)
        self.signer = signer or load_server_signer(settings.key_dir)
        self.server_key = VerificationKey.from_signer(self.signer)
        self._keys: dict[str, VerificationKey] = {}
        self._policy: tuple[float, PolicyVersion] | None = None
        self._policy_lock = threading.Lock()
        self._aead: AESGCM | None = None
        self._hot = hot.Statements(self.engine.dialect.name)
        self.ensure_default_policy()

    # ---- plumbing -------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads (SQLite: a deferred transaction, no write lock)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(bam_readonly=True)
            try:
                yield conn
            finally:
                conn.rollback()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (SQLite: BEGIN IMMEDIATE), committed on success."""
        with self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    def audit(
        self,
        conn: Connection,
        actor: str,
        event: str,
        workload: str | None,
        detail: dict[str, Any],
        now: float | None = None,
    ) -> None:
        conn.execute(
            _INS_AUDIT,
            {
                "at": now or time.time(),
                "actor": actor[:160],
                "event": event,
                "workload": workload,
                "detail": _dumps(detail),
            },
        )

    def _vk(self, jwk_text: str) -> VerificationKey:
        vk = self._keys.get(jwk_text)
        if vk is None:
            vk = VerificationKey.from_jwk(json.loads(jwk_text))
            if len(self._keys) > 50_000:
                self._keys.clear()
            self._keys[jwk_text] = vk
        return vk

    # ---- policies -------------------------------------------------------------------------

    def ensure_default_policy(self) -> None:
        """Store the shipped policy as version 1 when no policy exists yet."""
        with self.read() as conn:
            exists = conn.execute(select(P.c.id).limit(1)).first()
        if exists is not None:
            return
        source = default_source()
        try:
            with self.write() as conn:
                if conn.execute(select(P.c.id).limit(1)).first() is None:
                    self._insert_policy(conn, DEFAULT_NAME, source, "system", time.time())
        except Exception:  # another replica stored it first (unique name+version)
            log.debug("default policy already stored by another process")

    def _insert_policy(
        self, conn: Connection, name: str, source: str, actor: str, now: float
    ) -> PolicyVersion:
        top = conn.execute(select(func.max(P.c.version))).scalar()
        pv = PolicyVersion(name=name, version=(top or 0) + 1, source=source)
        conn.execute(
            insert(P).values(
                name=pv.name,
                version=pv.version,
                sha256=pv.sha256,
                source=source,
                created_at=now,
                created_by=actor,
            )
        )
        self.audit(
            conn,
            actor,
            "policy_set",
            None,
            {"policy_id": pv.policy_id, "sha256": pv.sha256},
            now,
        )
        return pv

    def set_policy(self, source: str, actor: str, name: str = "bam") -> tuple[PolicyVersion, float]:
        """Validate (compile and test-evaluate) ``source`` and store it as the next version.

        A broken policy raises :class:`PolicyError` with the Rego error and is never stored.
        """
        validate(source, name)
        now = time.time()
        with self.write() as conn:
            pv = self._insert_policy(conn, name, source, actor, now)
        with self._policy_lock:
            self._policy = (time.monotonic(), pv)
        return pv, now

    def active_policy(self) -> PolicyVersion:
        """The policy in force (highest version), cached for ``policy_refresh_s``."""
        cached = self._policy
        if cached is not None and time.monotonic() - cached[0] < self.settings.policy_refresh_s:
            return cached[1]
        with self.read() as conn:
            row = conn.execute(
                select(P.c.name, P.c.version, P.c.source).order_by(P.c.version.desc()).limit(1)
            ).first()
        if row is None:
            raise ServerError(503, "no_policy", "no policy is stored; run `bam server init`")
        pv = PolicyVersion(name=row.name, version=row.version, source=row.source)
        with self._policy_lock:
            self._policy = (time.monotonic(), pv)
        return pv

    def policy_rows(self, limit: int = 50) -> list[RowMapping]:
        with self.read() as conn:
            return list(
                conn.execute(select(P).order_by(P.c.version.desc()).limit(limit)).mappings()
            )

    # ---- tokens and enrolment ---------------------------------------------------------------

    def create_enrol_token(
        self, actor: str, note: str = "", ttl_s: float | None = None
    ) -> tuple[str, float]:
        token = new_secret_token(ENROL_PREFIX)
        now = time.time()
        expires = now + (ttl_s or self.settings.enrol_token_ttl_s)
        with self.write() as conn:
            conn.execute(
                insert(T).values(
                    token_hash=token_hash(token),
                    note=note,
                    created_at=now,
                    created_by=actor,
                    expires_at=expires,
                )
            )
            self.audit(
                conn, actor, "enrol_token_created", None, {"note": note, "expires_at": expires}, now
            )
        return token, expires

    def create_operator_token(self, name: str, role: str, actor: str) -> str:
        if role not in ROLES:
            raise ServerError(422, "role_invalid", f"role must be one of {', '.join(ROLES)}")
        token = new_secret_token(OPERATOR_PREFIX)
        now = time.time()
        with self.write() as conn:
            if conn.execute(select(OT.c.id).where(OT.c.name == name)).first() is not None:
                raise ServerError(409, "token_exists", f"an operator token named {name!r} exists")
            conn.execute(
                insert(OT).values(
                    name=name, token_hash=token_hash(token), role=role, created_at=now
                )
            )
            self.audit(
                conn, actor, "operator_token_created", None, {"name": name, "role": role}, now
            )
        return token

    def revoke_operator_token(self, name: str, actor: str) -> None:
        now = time.time()
        with self.write() as conn:
            n = conn.execute(
                update(OT)
                .where(OT.c.name == name, OT.c.revoked_at.is_(None))
                .values(revoked_at=now)
            ).rowcount
            if n != 1:
                raise ServerError(404, "token_unknown", f"no active operator token named {name!r}")
            self.audit(conn, actor, "operator_token_revoked", None, {"name": name}, now)

    def operator(self, token: str) -> Operator | None:
        """The operator a bearer token belongs to (``None``: unknown or revoked)."""
        if not token.startswith(OPERATOR_PREFIX) or len(token) > 128:
            return None
        with self.read() as conn:
            row = conn.execute(
                select(OT.c.name, OT.c.role).where(
                    OT.c.token_hash == token_hash(token), OT.c.revoked_at.is_(None)
                )
            ).first()
        return None if row is None else Operator(row.name, row.role)

    def enrol(
        self,
        token: str,
        name: str,
        key: dict[str, str],
        ak: dict[str, str] | None,
        proof: str,
    ) -> dict[str, Any]:
        """Register an agent's key (and TPM AK) with a one-time enrolment token."""
        try:
            vk = VerificationKey.from_jwk(key)
            ak_vk = VerificationKey.from_jwk(ak) if ak is not None else None
        except KeyStoreError as e:
            raise ServerError(422, "key_invalid", e.message) from None
        if ak_vk is not None and ak_vk.alg != "ES256":
            raise ServerError(422, "key_invalid", "the attestation key must be a P-256 key")
        try:
            sig = b64url_decode(proof, "proof")
        except VerificationError:
            raise ServerError(422, "proof_invalid", "proof is not base64url") from None
        if not verify_raw_signature(vk, enrol_message(token, vk.kid), sig):
            raise ServerError(
                401, "proof_invalid", "proof is not a signature by the key over the token"
            )
        now = time.time()
        agent_id = "agt_" + secrets.token_hex(8)
        with self.write() as conn:
            used = conn.execute(
                update(T)
                .where(
                    T.c.token_hash == token_hash(token),
                    T.c.used_at.is_(None),
                    T.c.expires_at > now,
                )
                .values(used_at=now, used_by=agent_id)
            ).rowcount
            if used != 1:
                raise ServerError(
                    401, "enrol_token_invalid", "enrolment token is unknown, used or expired"
                )
            clash = conn.execute(
                select(A.c.name, A.c.kid).where(or_(A.c.name == name, A.c.kid == vk.kid))
            ).first()
            if clash is not None:
                what = "name" if clash.name == name else "key"
                raise ServerError(409, "agent_exists", f"an agent with this {what} is enrolled")
            conn.execute(
                insert(A).values(
                    id=agent_id,
                    name=name,
                    kid=vk.kid,
                    jwk=_dumps(vk.jwk),
                    ak_kid=ak_vk.kid if ak_vk else None,
                    ak_jwk=_dumps(ak_vk.jwk) if ak_vk else None,
                    enrolled_at=now,
                    last_seq=0,
                    last_digest="0" * 64,
                )
            )
            self.audit(
                conn,
                f"agent:{agent_id}",
                "enrolled",
                None,
                {"name": name, "kid": vk.kid, "ak": ak_vk.kid if ak_vk else None},
                now,
            )
        return {
            "agent_id": agent_id,
            "name": name,
            "kid": vk.kid,
            "server_kid": self.server_key.kid,
            "server_jwk": self.server_key.jwk,
        }

    def revoke_agent(self, name: str, actor: str) -> None:
        now = time.time()
        with self.write() as conn:
            n = conn.execute(
                update(A).where(A.c.name == name, A.c.revoked_at.is_(None)).values(revoked_at=now)
            ).rowcount
            if n != 1:
                raise ServerError(404, "agent_unknown", f"no enrolled agent named {name!r}")
            self.audit(conn, actor, "agent_revoked", None, {"name": name}, now)

    # ---- agent authentication -----------------------------------------------------------------

    def _agent_by_kid(self, conn: Connection, kid: str) -> RowMapping:
        row = conn.execute(_SEL_AGENT_BY_KID, {"kid": kid}).mappings().first()
        if row is None:
            raise ServerError(401, "unknown_agent", f"no agent is enrolled with key {kid[:64]!r}")
        if row["revoked_at"] is not None:
            raise ServerError(403, "agent_revoked", f"agent {row['name']!r} is revoked")
        return row

    def authenticate_agent(
        self, header: str | None, method: str, path: str, body: bytes
    ) -> RowMapping:
        """The agent that signed this request (``BAM-Signature``), or 401."""
        sig = parse_signature_header(header)
        now = time.time()
        if abs(now - sig.ts) > self.settings.request_max_age_s:
            raise ServerError(401, "auth_expired", "BAM-Signature ts is too old or in the future")
        with self.read() as conn:
            agent = self._agent_by_kid(conn, sig.kid)
        vk = self._vk(agent["jwk"])
        if not verify_raw_signature(vk, request_message(method, path, sig.ts, body), sig.sig):
            raise ServerError(
                401, "bad_signature", "BAM-Signature does not verify with the pinned key"
            )
        return agent

    # ---- workloads ----------------------------------------------------------------------------

    def register_workload(
        self, agent: RowMapping, name: str, kind: str, interval_s: float
    ) -> dict[str, Any]:
        """Create (or, for the same agent, update) a workload; idempotent."""
        now = time.time()
        with self.write() as conn:
            ratelimit.hit(conn, agent["id"], self.settings.agent_requests_per_minute, now)
            row = conn.execute(select(W).where(W.c.name == name)).mappings().first()
            if row is not None and row["agent_id"] != agent["id"]:
                raise ServerError(
                    409, "workload_exists", f"workload {name!r} belongs to another agent"
                )
            if row is None:
                conn.execute(
                    insert(W).values(
                        name=name,
                        agent_id=agent["id"],
                        kind=kind,
                        interval_s=interval_s,
                        created_at=now,
                        status="none",
                        action="allow",
                        hold=False,
                        stale=False,
                        version=0,
                    )
                )
                self.audit(
                    conn,
                    f"agent:{agent['id']}",
                    "workload_registered",
                    name,
                    {"kind": kind, "interval_s": interval_s},
                    now,
                )
            elif row["kind"] != kind or row["interval_s"] != interval_s:
                conn.execute(
                    update(W)
                    .where(W.c.id == row["id"])
                    .values(kind=kind, interval_s=interval_s, version=W.c.version + 1)
                )
        return self.workload(name)

    def _workload_row(self, conn: Connection, name: str) -> RowMapping:
        row = conn.execute(select(W).where(W.c.name == name)).mappings().first()
        if row is None:
            raise ServerError(404, "workload_unknown", f"no workload named {name!r}")
        return row

    def workload(self, name: str) -> dict[str, Any]:
        with self.read() as conn:
            j = W.join(A, W.c.agent_id == A.c.id)
            row = (
                conn.execute(
                    select(W, A.c.name.label("agent_name")).select_from(j).where(W.c.name == name)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise ServerError(404, "workload_unknown", f"no workload named {name!r}")
        return _workload_out(row)

    def workloads(self) -> list[dict[str, Any]]:
        with self.read() as conn:
            j = W.join(A, W.c.agent_id == A.c.id)
            rows = conn.execute(
                select(W, A.c.name.label("agent_name")).select_from(j).order_by(W.c.name)
            ).mappings()
            return [_workload_out(r) for r in rows]

    def set_reference(self, name: str, files: dict[str, str], actor: str) -> None:
        now = time.time()
        with self.write() as conn:
            row = self._workload_row(conn, name)
            conn.execute(
                update(W)
                .where(W.c.id == row["id"])
                .values(reference=_dumps({"files": files}), version=W.c.version + 1)
            )
            self.audit(conn, actor, "reference_set", name, {"files": len(files)}, now)

    # ---- challenges ---------------------------------------------------------------------------

    def _insert_nonce(self, conn: Connection, agent_id: str, now: float) -> tuple[str, float]:
        nonce = new_nonce(32)
        expires = now + self.settings.nonce_ttl_s
        conn.execute(
            _INS_NONCE,
            {
                "nonce_hash": _nonce_hash(nonce),
                "agent_id": agent_id,
                "issued_at": now,
                "expires_at": expires,
            },
        )
        return nonce, expires

    def challenge(self, agent: RowMapping) -> tuple[str, float]:
        """A fresh single-use nonce bound to ``agent`` (expires in ``nonce_ttl_s``)."""
        now = time.time()
        with self.write() as conn:
            ratelimit.hit(conn, agent["id"], self.settings.agent_requests_per_minute, now)
            return self._insert_nonce(conn, agent["id"], now)

    # ---- evidence -----------------------------------------------------------------------------

    def submit_evidence(self, token: str) -> EvidenceOutcome:
        """Verify, appraise and store one evidence token (see the module docstring).

        Runs on one pooled connection with the plain statements of :mod:`bam.server.db.hot`.
        """
        text = token.strip()
        if not text.isascii():
            raise ServerError(422, "malformed", "token is not ASCII")
        digest = sha256_hex(text.encode("ascii"))
        kid = _header_kid(text)
        limit = self.settings.agent_requests_per_minute
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            for _attempt in range(5):
                now = time.time()
                row = hot.one(
                    cur,
                    self._hot.agent,
                    {"kid": kid, "digest": digest, "window": ratelimit.window(now)},
                )
                if row is None:
                    raise ServerError(
                        401, "unknown_agent", f"no agent is enrolled with key {kid[:64]!r}"
                    )
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
                vk = self._vk(agent["jwk"])
                try:
                    return self._appraise_evidence(raw, cur, text, digest, agent, vk)
                except _RetryError:
                    raw.rollback()
            raise ServerError(409, "conflict", "concurrent updates kept conflicting; retry")
        finally:
            try:
                raw.rollback()  # no-op after a commit; undoes anything left on an error
            finally:
                raw.close()

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
        return EvidenceOutcome(ev.id, digest, ev.seq, True, _result_out(res), None)

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
        raw: Any,
        cur: Any,
        text: str,
        digest: str,
        agent: dict[str, Any],
        vk: VerificationKey,
    ) -> EvidenceOutcome:
        now = time.time()
        verified, missing = self._verify(text, agent, vk, now)
        claims = verified.claims
        target = claims.submods.measurements.target
        nonce_h = _nonce_hash(claims.eat_nonce)
        row = hot.one(cur, self._hot.workload, {"h": nonce_h, "name": target.name})
        if row is None or row[2] != agent["id"]:
            raise ServerError(
                422,
                "workload_unknown",
                f"workload {target.name!r} is not registered for this agent",
            )
        wl = dict(zip(hot.WORKLOAD_COLUMNS, row, strict=False))
        wl["hold"], wl["stale"] = bool(wl["hold"]), bool(wl["stale"])
        n = len(hot.WORKLOAD_COLUMNS)
        nonce_row = (
            None
            if row[n] is None
            else {"agent_id": row[n], "used_at": row[n + 1], "expires_at": row[n + 2]}
        )
        _check_nonce(nonce_row, agent["id"], now)  # early, cheap rejection; re-checked below

        document = self._evidence_input(agent, wl, verified, missing)
        appraisal, decision = self._decide(wl, document, now)
        appraisal = replace(
            appraisal, nonce=claims.eat_nonce, evidence_digest=digest, seq=claims.bam_seq
        )
        ear = sign_ear(appraisal, self.signer, now)
        behavior = claims.submods.behavior
        score = _score(behavior.scores, behavior.thresholds) if behavior is not None else None
        tpm = verified.tpm_clock
        hold, hold_since, hold_action = _next_hold(wl, appraisal, decision, now)
        next_nonce = new_nonce(32)
        next_expires = now + self.settings.nonce_ttl_s
        reasons_json = _dumps(list(appraisal.reasons))
        params: dict[str, Any] = {
            # claim: rate limit, nonce, chain
            "agent": agent["id"],
            "window": ratelimit.window(now),
            "h": nonce_h,
            "now": now,
            "old_seq": agent["last_seq"],
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
            "next_h": _nonce_hash(next_nonce),
            "next_expires": next_expires,
        }
        limit = self.settings.agent_requests_per_minute
        st = self._hot
        if st.postgresql:
            count, issued_at, moved = hot.one(cur, st.pg_claim, params) or (None, None, 0)
        else:
            cur.execute("BEGIN IMMEDIATE")
            count = hot.one(cur, st.rate_hit, params)[0]  # type: ignore[index]
            used = hot.one(cur, st.use_nonce, params) if count <= limit else None
            issued_at = used[0] if used is not None else None
            moved = 0
            if issued_at is not None:
                cur.execute(st.move_chain, params)
                moved = cur.rowcount
        if count is None or count > limit:
            raise ratelimit.limited(agent["id"], limit, now)
        if issued_at is None:
            _check_nonce(_nonce_dict(hot.one(cur, st.nonce, {"h": nonce_h})), agent["id"], now)
            raise ServerError(409, "nonce_used", "the nonce was already used")
        if claims.iat < issued_at - self.settings.clock_skew_s:
            raise ServerError(422, "nonce_stale", "token was issued before its nonce")
        if moved != 1:
            raise _RetryError
        if st.postgresql:
            evidence_id, result_id, moved = hot.one(cur, st.pg_store, params) or (None, None, 0)
        else:
            evidence_id = hot.one(cur, st.insert_evidence, params)[0]  # type: ignore[index]
            params["evidence_id"] = evidence_id
            result_id = hot.one(cur, st.insert_result, params)[0]  # type: ignore[index]
            params["result_id"] = result_id
            cur.execute(st.move_workload, params)
            moved = cur.rowcount
            if moved == 1:
                cur.execute(st.insert_nonce, params)
        if moved != 1:
            raise _RetryError
        contra = appraisal.status == "contraindicated"
        if appraisal.action != wl["action"] or (contra and not wl["hold"]):
            cur.execute(
                st.insert_action,
                {**params, "result_id": result_id, "state": "pending"},
            )
            cur.execute(
                st.insert_audit,
                {
                    "now": now,
                    "actor": f"policy:{appraisal.policy_id}"[:160],
                    "event": "action",
                    "workload": wl["name"],
                    "detail": _dumps(
                        {
                            "action": appraisal.action,
                            "previous": wl["action"],
                            "status": appraisal.status,
                            "reasons": list(appraisal.reasons),
                            "result_id": result_id,
                            "trigger": appraisal.trigger,
                            "by": f"agent:{agent['id']}",
                        }
                    ),
                },
            )
        raw.commit()
        result = {
            "id": result_id,
            "workload": wl["name"],
            "status": appraisal.status,
            "action": appraisal.action,
            "reasons": list(appraisal.reasons),
            "trust_vector": appraisal.trust_vector,
            "policy_id": appraisal.policy_id,
            "policy_version": appraisal.policy_version,
            "trigger": appraisal.trigger,
            "created_at": now,
            "evidence_id": evidence_id,
            "ear": ear,
        }
        return EvidenceOutcome(
            evidence_id, digest, claims.bam_seq, False, result, (next_nonce, next_expires)
        )

    def _evidence_input(
        self,
        agent: Mapping[str, Any],
        wl: Mapping[str, Any],
        verified: VerifiedEvidence,
        missing: int,
    ) -> dict[str, Any]:
        """The policy input for one verified token (kept small: set_input cost grows with it)."""
        claims = verified.claims
        ms = claims.submods.measurements
        ref: dict[str, str] = json.loads(wl["reference"])["files"] if wl["reference"] else {}
        mismatches = [
            {"path": f.path, "role": f.role}
            for f in ms.files
            if f.path in ref and ref[f.path] != f.sha256
        ]
        unknown = sum(1 for f in ms.files if ref and f.path not in ref)
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
            "workload": _workload_input(wl, stale=False),
            "evidence": {
                "seq": claims.bam_seq,
                "iat": claims.iat,
                "tpm": claims.submods.tpm is not None,
                "chain_gap": missing > 0,
                "chain_missing": missing,
            },
            "measurements": {
                "reference": bool(ref),
                "mismatches": mismatches,
                "unknown": unknown,
                "deleted": [f.path for f in ms.files if f.deleted],
                "anon_exec_mappings": ms.anon_exec_mappings,
            },
            "behavior": behavior,
        }

    def _decide(
        self, wl: Mapping[Any, Any], document: dict[str, Any], now: float
    ) -> tuple[Appraisal, Decision]:
        """Evaluate the policy, then apply the hold (contraindicated sticks until an ack)."""
        policy = self.active_policy()
        try:
            decision = evaluate(policy, document)
        except PolicyError as e:
            # Fail closed: the evidence verified, but nobody can vouch for it.
            log.warning("policy %s failed: %s", policy.policy_id, e.message)
            decision = Decision(
                status="none", action="investigate", reasons=[f"{e.reason}: {e.message}"[:500]]
            )
        status, action, reasons = decision.status, decision.action, list(decision.reasons)
        if wl["hold"] and not decision.clear_hold and status != "contraindicated":
            status = "contraindicated"
            held = wl["hold_action"] or "investigate"
            if ACTION_RANK[held] > ACTION_RANK[action]:
                action = held  # type: ignore[assignment]
            reasons.append(_hold_reason(wl["hold_since"] or now))
        vector = {k: int(v) for k, v in decision.trust_vector.items()}
        return (
            Appraisal(
                workload=wl["name"],
                status=status,
                action=action,
                reasons=tuple(reasons),
                trust_vector=vector,
                policy_id=policy.policy_id,
                policy_version=policy.version,
                trigger=document["trigger"],
            ),
            decision,
        )

    def _store_appraisal(
        self,
        conn: Connection,
        wl: RowMapping,
        appraisal: Appraisal,
        decision: Decision,
        ear: str,
        now: float,
        *,
        evidence_id: int | None,
        severity: str | None,
        actor: str,
        stale: bool = False,
    ) -> dict[str, Any]:
        """Insert the result (and action, audit), then move the workload with a version CAS."""
        reasons_json = _dumps(list(appraisal.reasons))
        result_id = conn.execute(
            _INS_RESULT,
            {
                "evidence_id": evidence_id,
                "workload_id": wl["id"],
                "created_at": now,
                "trigger": appraisal.trigger,
                "status": appraisal.status,
                "action": appraisal.action,
                "reasons": reasons_json,
                "policy_id": appraisal.policy_id,
                "policy_version": appraisal.policy_version,
                "ear": ear,
            },
        ).scalar_one()
        contra = appraisal.status == "contraindicated"
        hold, hold_since, hold_action = _next_hold(wl, appraisal, decision, now)
        values: dict[str, Any] = {
            "status": appraisal.status,
            "action": appraisal.action,
            "hold": hold,
            "hold_since": hold_since,
            "hold_action": hold_action,
            "last_result_id": result_id,
            "last_result_at": now,
            "version": wl["version"] + 1,
        }
        if stale:
            values.update(stale=True, stale_since=now)
        else:
            values.update(stale=False, stale_since=None, last_evidence_at=now, severity=severity)
        moved = conn.execute(
            _workload_cas(tuple(sorted(values))), {**values, "wid": wl["id"], "old": wl["version"]}
        ).rowcount
        if moved != 1:
            raise _RetryError
        if appraisal.action != wl["action"] or (contra and not wl["hold"]):
            conn.execute(
                _INS_ACTION,
                {
                    "workload_id": wl["id"],
                    "agent_id": wl["agent_id"],
                    "result_id": result_id,
                    "action": appraisal.action,
                    "reasons": reasons_json,
                    "created_at": now,
                    "state": "pending",
                },
            )
            self.audit(
                conn,
                f"policy:{appraisal.policy_id}",
                "action",
                wl["name"],
                {
                    "action": appraisal.action,
                    "previous": wl["action"],
                    "status": appraisal.status,
                    "reasons": list(appraisal.reasons),
                    "result_id": result_id,
                    "trigger": appraisal.trigger,
                    "by": actor,
                },
                now,
            )
        return {
            "id": result_id,
            "workload": wl["name"],
            "status": appraisal.status,
            "action": appraisal.action,
            "reasons": list(appraisal.reasons),
            "trust_vector": appraisal.trust_vector,
            "policy_id": appraisal.policy_id,
            "policy_version": appraisal.policy_version,
            "trigger": appraisal.trigger,
            "created_at": now,
            "evidence_id": evidence_id,
            "ear": ear,
        }

    # ---- staleness ----------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> list[str]:
        """Mark workloads stale that missed interval × stale_factor; purge old nonces/counters.

        Every replica runs this; the version compare-and-set lets exactly one of them record
        each stale result.
        """
        now = now or time.time()
        factor = self.settings.stale_factor
        seen = func.coalesce(W.c.last_evidence_at, W.c.created_at)
        with self.read() as conn:
            rows = list(
                conn.execute(
                    select(W).where(W.c.stale.is_(False), seen + W.c.interval_s * factor < now)
                ).mappings()
            )
        marked: list[str] = []
        for wl in rows:
            document = {
                "trigger": "stale",
                "agent": {"id": wl["agent_id"], "name": "", "tpm": False},
                "workload": _workload_input(wl, stale=True),
                "evidence": {
                    "seq": 0,
                    "iat": 0,
                    "tpm": False,
                    "chain_gap": False,
                    "chain_missing": 0,
                },
                "measurements": {
                    "reference": bool(wl["reference"]),
                    "mismatches": [],
                    "unknown": 0,
                    "deleted": [],
                    "anon_exec_mappings": 0,
                },
                "behavior": None,
            }
            appraisal, decision = self._decide(wl, document, now)
            ear = sign_ear(appraisal, self.signer, now)
            try:
                with self.write() as conn:
                    self._store_appraisal(
                        conn,
                        wl,
                        appraisal,
                        decision,
                        ear,
                        now,
                        evidence_id=None,
                        severity=wl["severity"],
                        actor="system:stale",
                        stale=True,
                    )
                    self.audit(
                        conn,
                        "system:stale",
                        "stale",
                        wl["name"],
                        {
                            "last_evidence_at": wl["last_evidence_at"],
                            "interval_s": wl["interval_s"],
                        },
                        now,
                    )
                marked.append(wl["name"])
            except _RetryError:
                continue  # evidence arrived, or another replica marked it
        with self.write() as conn:
            conn.execute(delete(N).where(N.c.expires_at < now - 3600))
            conn.execute(
                delete(m.table(m.RateCounter)).where(
                    m.table(m.RateCounter).c.window < ratelimit.purge_before(now)
                )
            )
        return marked

    # ---- operator actions ---------------------------------------------------------------------

    def ack(self, name: str, actor: str, note: str = "") -> dict[str, Any]:
        """Release a workload's hold: the next appraisal alone decides its status again."""
        now = time.time()
        with self.write() as conn:
            wl = self._workload_row(conn, name)
            if not wl["hold"]:
                raise ServerError(409, "not_held", f"workload {name!r} has no contraindicated hold")
            conn.execute(
                update(W)
                .where(W.c.id == wl["id"])
                .values(hold=False, hold_since=None, hold_action=None, version=W.c.version + 1)
            )
            self.audit(
                conn,
                actor,
                "ack",
                name,
                {"note": note, "held_since": wl["hold_since"], "action": wl["hold_action"]},
                now,
            )
        return self.workload(name)

    # ---- actions for agents -------------------------------------------------------------------

    def actions_for(self, agent_id: str, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        with self.read() as conn:
            j = AC.join(W, AC.c.workload_id == W.c.id)
            rows = conn.execute(
                select(AC, W.c.name.label("workload"))
                .select_from(j)
                .where(AC.c.agent_id == agent_id, AC.c.id > after)
                .order_by(AC.c.id)
                .limit(limit)
            ).mappings()
            return [_action_out(r) for r in rows]

    def report_action(self, agent: RowMapping, action_id: int, state: str, outcome: str) -> None:
        now = time.time()
        with self.write() as conn:
            row = (
                conn.execute(
                    select(AC, W.c.name.label("workload"))
                    .select_from(AC.join(W, AC.c.workload_id == W.c.id))
                    .where(AC.c.id == action_id)
                )
                .mappings()
                .first()
            )
            if row is None or row["agent_id"] != agent["id"]:
                raise ServerError(404, "action_unknown", f"no action {action_id} for this agent")
            conn.execute(
                update(AC)
                .where(AC.c.id == action_id)
                .values(state=state, done_at=now, outcome=outcome)
            )
            self.audit(
                conn,
                f"agent:{agent['id']}",
                f"action_{state}",
                row["workload"],
                {"action_id": action_id, "action": row["action"], "outcome": outcome},
                now,
            )

    # ---- queries ------------------------------------------------------------------------------

    @staticmethod
    def _result_query() -> Any:
        return select(R, W.c.name.label("workload")).select_from(
            R.join(W, R.c.workload_id == W.c.id)
        )

    def results(
        self, name: str, limit: int = 50, before: int | None = None
    ) -> list[dict[str, Any]]:
        with self.read() as conn:
            wl = self._workload_row(conn, name)
            q = self._result_query().where(R.c.workload_id == wl["id"])
            if before is not None:
                q = q.where(R.c.id < before)
            rows = conn.execute(q.order_by(R.c.id.desc()).limit(limit)).mappings()
            return [_result_out(r) for r in rows]

    def result(self, result_id: int) -> dict[str, Any]:
        with self.read() as conn:
            row = conn.execute(self._result_query().where(R.c.id == result_id)).mappings().first()
        if row is None:
            raise ServerError(404, "result_unknown", f"no result {result_id}")
        return _result_out(row)

    def evidence(self, name: str, limit: int = 200) -> list[dict[str, Any]]:
        with self.read() as conn:
            wl = self._workload_row(conn, name)
            rows = conn.execute(
                select(
                    E.c.id,
                    E.c.seq,
                    E.c.digest,
                    E.c.iat,
                    E.c.received_at,
                    E.c.severity,
                    E.c.label,
                    E.c.score,
                    E.c.window_end,
                )
                .where(E.c.workload_id == wl["id"])
                .order_by(E.c.id.desc())
                .limit(limit)
            ).mappings()
            return [dict(r) for r in rows]

    def evidence_token(self, evidence_id: int) -> str:
        with self.read() as conn:
            tok = conn.execute(select(E.c.token).where(E.c.id == evidence_id)).scalar()
        if tok is None:
            raise ServerError(404, "evidence_unknown", f"no evidence {evidence_id}")
        return str(tok)

    def audit_log(self, workload: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        with self.read() as conn:
            q = select(AU)
            if workload is not None:
                q = q.where(AU.c.workload == workload)
            rows = conn.execute(q.order_by(AU.c.id.desc()).limit(limit)).mappings()
            return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]

    def workload_actions(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        with self.read() as conn:
            wl = self._workload_row(conn, name)
            rows = conn.execute(
                select(AC, W.c.name.label("workload"))
                .select_from(AC.join(W, AC.c.workload_id == W.c.id))
                .where(AC.c.workload_id == wl["id"])
                .order_by(AC.c.id.desc())
                .limit(limit)
            ).mappings()
            return [_action_out(r) for r in rows]

    def agents(self) -> list[dict[str, Any]]:
        with self.read() as conn:
            rows = conn.execute(select(A).order_by(A.c.name)).mappings()
            return [
                {
                    "id": r["id"],
                    "name": r["name"],
                    "kid": r["kid"],
                    "tpm": r["ak_kid"] is not None,
                    "enrolled_at": r["enrolled_at"],
                    "revoked": r["revoked_at"] is not None,
                    "last_seq": r["last_seq"],
                    "last_evidence_at": r["last_evidence_at"],
                }
                for r in rows
            ]

    def counts(self) -> dict[str, int]:
        with self.read() as conn:
            return {
                "agents": conn.execute(select(func.count()).select_from(A)).scalar_one(),
                "workloads": conn.execute(select(func.count()).select_from(W)).scalar_one(),
                "evidence": conn.execute(select(func.count()).select_from(E)).scalar_one(),
                "results": conn.execute(select(func.count()).select_from(R)).scalar_one(),
            }

    # ---- access gate and secrets --------------------------------------------------------------

    def _freshness(self, wl: RowMapping, now: float) -> bool:
        at = wl["last_result_at"]
        if at is None:
            return False
        limit = min(self.settings.release_max_age_s, wl["interval_s"] * self.settings.stale_factor)
        return bool(now - at <= limit)

    def access(self, name: str) -> dict[str, Any]:
        """Relying-party view: latest signed EAR and a plain allow/deny."""
        now = time.time()
        with self.read() as conn:
            wl = self._workload_row(conn, name)
            res = None
            if wl["last_result_id"] is not None:
                res = (
                    conn.execute(select(R).where(R.c.id == wl["last_result_id"])).mappings().first()
                )
        fresh = self._freshness(wl, now)
        status = res["status"] if res else "none"
        allow = bool(
            res is not None
            and status == "affirming"
            and fresh
            and not wl["stale"]
            and not wl["hold"]
        )
        return {
            "workload": name,
            "allow": allow,
            "status": status,
            "action": res["action"] if res else "allow",
            "fresh": fresh,
            "hold": bool(wl["hold"]),
            "stale": bool(wl["stale"]),
            "reasons": json.loads(res["reasons"]) if res else ["no result yet"],
            "result_id": res["id"] if res else None,
            "result_at": res["created_at"] if res else None,
            "ear": res["ear"] if res else None,
            "server_kid": self.server_key.kid,
        }

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            path = self.settings.key_dir / "secrets.key"
            self._aead = AESGCM(_load_or_create_key(path))
        return self._aead

    def put_secret(self, name: str, secret: str, value: str, actor: str) -> None:
        now = time.time()
        with self.write() as conn:
            wl = self._workload_row(conn, name)
            iv = os.urandom(12)
            blob = iv + self._cipher().encrypt(iv, value.encode(), f"{name}/{secret}".encode())
            conn.execute(delete(S).where(S.c.workload_id == wl["id"], S.c.name == secret))
            conn.execute(
                insert(S).values(workload_id=wl["id"], name=secret, ciphertext=blob, created_at=now)
            )
            self.audit(conn, actor, "secret_stored", name, {"secret": secret}, now)

    def release_secret(self, agent: RowMapping, name: str, secret: str) -> str:
        """The secret, only for the workload's own agent, affirming, fresh, not held or stale.

        Refusals are audited in their own transaction (the refusal itself rolls nothing back).
        """
        now = time.time()
        actor = f"agent:{agent['id']}"
        with self.read() as conn:
            wl = self._workload_row(conn, name)
        if wl["agent_id"] != agent["id"]:
            raise ServerError(403, "forbidden", f"workload {name!r} belongs to another agent")
        access = self.access(name)
        if not access["allow"]:
            why = (
                "stale"
                if access["stale"]
                else "held"
                if access["hold"]
                else "not fresh"
                if not access["fresh"]
                else access["status"]
            )
            with self.write() as conn:
                ratelimit.hit(conn, agent["id"], self.settings.agent_requests_per_minute, now)
                self.audit(conn, actor, "secret_denied", name, {"secret": secret, "why": why}, now)
            raise ServerError(
                403, "not_trusted", f"workload {name!r} is not affirming and fresh ({why})"
            )
        with self.write() as conn:
            ratelimit.hit(conn, agent["id"], self.settings.agent_requests_per_minute, now)
            # The decision above was on a snapshot: release only if nothing moved since.
            cur = conn.execute(
                select(W.c.hold, W.c.stale, W.c.last_result_id).where(W.c.id == wl["id"])
            ).first()
            if cur is None or cur.hold or cur.stale or cur.last_result_id != access["result_id"]:
                raise ServerError(409, "state_changed", "the workload's state changed; retry")
            blob = conn.execute(
                select(S.c.ciphertext).where(S.c.workload_id == wl["id"], S.c.name == secret)
            ).scalar()
            if blob is None:
                raise ServerError(404, "secret_unknown", f"no secret {secret!r} for {name!r}")
            value = self._cipher().decrypt(blob[:12], blob[12:], f"{name}/{secret}".encode())
            self.audit(
                conn,
                actor,
                "secret_released",
                name,
                {"secret": secret, "result_id": access["result_id"]},
                now,
            )
        return value.decode()


# ---- helpers ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _workload_cas(columns: tuple[str, ...]) -> Any:
    """``UPDATE workloads SET <columns> WHERE id = :wid AND version = :old`` (cached)."""
    return (
        update(W)
        .where(W.c.id == bindparam("wid"), W.c.version == bindparam("old"))
        .values({c: bindparam(c) for c in columns})
    )


def _nonce_hash(nonce: str) -> str:
    # Stored and looked up by digest: the table never holds a usable nonce.
    return hashlib.sha256(nonce.encode("utf-8", "surrogatepass")).hexdigest()


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


def _next_hold(
    wl: Mapping[Any, Any], appraisal: Appraisal, decision: Decision, now: float
) -> tuple[bool, float | None, str | None]:
    """The workload's hold after ``appraisal``: contraindicated sticks until cleared."""
    contra = appraisal.status == "contraindicated"
    hold, hold_since, hold_action = bool(wl["hold"]), wl["hold_since"], wl["hold_action"]
    if contra and not hold:
        return True, now, appraisal.action
    if contra and hold and ACTION_RANK[appraisal.action] > ACTION_RANK[hold_action or "allow"]:
        return hold, hold_since, appraisal.action
    if hold and decision.clear_hold:
        return False, None, None
    return hold, hold_since, hold_action


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


def _workload_input(wl: Mapping[Any, Any], *, stale: bool) -> dict[str, Any]:
    return {
        "name": wl["name"],
        "kind": wl["kind"],
        "interval_s": wl["interval_s"],
        "stale": stale,
        "was_stale": bool(wl["stale"]),
        "hold": bool(wl["hold"]),
        "previous_status": wl["status"],
        "previous_action": wl["action"],
    }


def _workload_out(row: RowMapping) -> dict[str, Any]:
    return {
        "name": row["name"],
        "kind": row["kind"],
        "agent_id": row["agent_id"],
        "agent_name": row["agent_name"],
        "interval_s": row["interval_s"],
        "status": row["status"],
        "action": row["action"],
        "severity": row["severity"],
        "hold": bool(row["hold"]),
        "hold_since": row["hold_since"],
        "stale": bool(row["stale"]),
        "stale_since": row["stale_since"],
        "last_evidence_at": row["last_evidence_at"],
        "last_result_at": row["last_result_at"],
        "has_reference": row["reference"] is not None,
    }


def _result_out(row: RowMapping) -> dict[str, Any]:
    vector: dict[str, int] = {}
    try:
        payload = json.loads(b64url_decode(row["ear"].split(".")[1]))
        vector = next(iter(payload["submods"].values()))["ear.trustworthiness-vector"]
    except (ValueError, KeyError, IndexError, StopIteration, VerificationError):
        pass
    return {
        "id": row["id"],
        "workload": row["workload"],
        "status": row["status"],
        "action": row["action"],
        "reasons": json.loads(row["reasons"]),
        "trust_vector": vector,
        "policy_id": row["policy_id"],
        "policy_version": row["policy_version"],
        "trigger": row["trigger"],
        "created_at": row["created_at"],
        "evidence_id": row["evidence_id"],
        "ear": row["ear"],
    }


def _action_out(row: RowMapping) -> dict[str, Any]:
    return {
        "id": row["id"],
        "workload": row["workload"],
        "action": row["action"],
        "reasons": json.loads(row["reasons"]),
        "created_at": row["created_at"],
        "state": row["state"],
        "result_id": row["result_id"],
        "done_at": row["done_at"],
        "outcome": row["outcome"],
    }


def _load_or_create_key(path: Path) -> bytes:
    """A 256-bit key file (0600 in a 0700 directory), created atomically on first use.

    Written to a temporary file and hard-linked into place, so a concurrent reader never sees
    a partial key and two creators agree on one (the loser reads the winner's).
    """
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, AESGCM.generate_key(bit_length=256))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    data = path.read_bytes()
    if len(data) != 32:
        raise ServerError(500, "secret_key_invalid", f"{path} is not a 32-byte key")
    return data
