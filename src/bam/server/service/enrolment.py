"""Agents joining and proving who they are: enrolment tokens, enrolment, request signatures.

An agent enrols once with a one-time token and a proof of possession of the key it registers;
that key (and its TPM AK) is pinned to the agent from then on. Every later agent request is
signed by the pinned key (``BAM-Signature``), except evidence, which is a signed token itself.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import Connection, RowMapping, insert, or_, select, update

from bam.evidence.canonical import ZERO_DIGEST, b64url_decode
from bam.evidence.errors import KeyStoreError, VerificationError
from bam.evidence.keys.base import VerificationKey
from bam.server.auth import (
    ENROL_PREFIX,
    enrol_message,
    new_secret_token,
    parse_signature_header,
    request_message,
    token_hash,
)
from bam.server.errors import ServerError
from bam.server.service.core import SEL_AGENT_BY_KID, A, ServiceCore, T, dumps


class EnrolmentMixin(ServiceCore):
    """Enrolment tokens, enrolment, revocation and agent request authentication."""

    def create_enrol_token(
        self, actor: str, note: str = "", ttl_s: float | None = None
    ) -> tuple[str, float]:
        """A one-time enrolment token (only its sha256 is stored) and its expiry."""
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
        if not vk.verify(enrol_message(token, vk.kid), sig):
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
                    jwk=dumps(vk.jwk),
                    ak_kid=ak_vk.kid if ak_vk else None,
                    ak_jwk=dumps(ak_vk.jwk) if ak_vk else None,
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

    def reset_chain(self, name: str, actor: str, note: str = "") -> dict[str, Any]:
        """Let an agent that lost its chain state start a new chain (audited).

        A new chain epoch starts: the agent's next token is accepted as a first token (its
        ``bam_seq`` and ``bam_prev`` link to nothing; nonces still make it single-use), stored
        under the new epoch and reported to policy as ``chain_reset``; the TPM clock history
        starts again with it too. Why an operator and not the agent: a chain that no longer
        links is what a rolled-back or cloned agent looks like, so only a person who knows why
        may let it continue.
        """
        now = time.time()
        with self.write() as conn:
            row = (
                conn.execute(select(A).where(A.c.name == name, A.c.revoked_at.is_(None)))
                .mappings()
                .first()
            )
            if row is None:
                raise ServerError(404, "agent_unknown", f"no enrolled agent named {name!r}")
            epoch = row["chain_epoch"] + 1
            conn.execute(
                update(A)
                .where(A.c.id == row["id"])
                .values(
                    last_seq=0,
                    last_digest=ZERO_DIGEST,
                    last_nonce=None,
                    tpm_clock=None,
                    tpm_reset=None,
                    tpm_restart=None,
                    tpm_safe=None,
                    chain_epoch=epoch,
                )
            )
            detail = {"name": name, "last_seq": row["last_seq"], "epoch": epoch, "note": note}
            self.audit(conn, actor, "agent_chain_reset", None, detail, now)
        return {"name": name, "previous_seq": row["last_seq"], "epoch": epoch, "reset_at": now}

    def _agent_by_kid(self, conn: Connection, kid: str) -> RowMapping:
        row = conn.execute(SEL_AGENT_BY_KID, {"kid": kid}).mappings().first()
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
        if not vk.verify(request_message(method, path, sig.ts, body), sig.sig):
            raise ServerError(
                401, "bad_signature", "BAM-Signature does not verify with the pinned key"
            )
        return agent
