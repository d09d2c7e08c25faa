"""Operators: their API tokens, and the one decision only they make (releasing a hold)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import insert, select, update

from bam.server.auth import OPERATOR_PREFIX, ROLES, Operator, new_secret_token, token_hash
from bam.server.errors import ServerError
from bam.server.service.core import OT, W
from bam.server.service.queries import QueriesMixin


class OperatorsMixin(QueriesMixin):
    """Operator tokens (stored as digests) and acknowledgements."""

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
