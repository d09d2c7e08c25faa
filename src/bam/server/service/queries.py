"""Read-only views for the API, the dashboard and the CLI: workloads, results, evidence, audit.

Nothing here writes; every function opens a read connection (SQLite: no write lock).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import RowMapping, func, select

from bam.evidence.canonical import b64url_decode
from bam.evidence.errors import VerificationError
from bam.server.errors import ServerError
from bam.server.service.core import AC, AU, A, E, R, ServiceCore, W


class QueriesMixin(ServiceCore):
    """What operators and dashboards read."""

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
                select(
                    W,
                    A.c.name.label("agent_name"),
                    A.c.refused_reason.label("agent_refused"),
                    A.c.refused_at.label("agent_refused_at"),
                )
                .select_from(j)
                .order_by(W.c.name)
            ).mappings()
            return [_workload_out(r) for r in rows]

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
            return [result_out(r) for r in rows]

    def result(self, result_id: int) -> dict[str, Any]:
        with self.read() as conn:
            row = conn.execute(self._result_query().where(R.c.id == result_id)).mappings().first()
        if row is None:
            raise ServerError(404, "result_unknown", f"no result {result_id}")
        return result_out(row)

    def evidence(self, name: str, limit: int = 200) -> list[dict[str, Any]]:
        with self.read() as conn:
            wl = self._workload_row(conn, name)
            rows = conn.execute(
                select(
                    E.c.id,
                    E.c.chain_epoch,
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
            return [action_out(r) for r in rows]

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
                    "chain_epoch": r["chain_epoch"],
                    "last_seq": r["last_seq"],
                    "last_evidence_at": r["last_evidence_at"],
                    "refused_reason": r["refused_reason"],
                    "refused_at": r["refused_at"],
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
        "agent_refused": row.get("agent_refused"),
        "agent_refused_at": row.get("agent_refused_at"),
    }


def result_out(row: RowMapping) -> dict[str, Any]:
    """A stored result row as the API shows it (trust vector read back from its EAR)."""
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


def action_out(row: RowMapping) -> dict[str, Any]:
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
