"""Workloads: registered by their agent, given reference values by operators."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import RowMapping, insert, select, update

from bam.server import ratelimit
from bam.server.errors import ServerError
from bam.server.service.core import W, dumps
from bam.server.service.queries import QueriesMixin


class WorkloadsMixin(QueriesMixin):
    """Registration (agent side) and reference values (operator side)."""

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

    def set_reference(self, name: str, files: dict[str, str], actor: str) -> None:
        """Reference file digests the workload's measurements are compared with."""
        now = time.time()
        with self.write() as conn:
            row = self._workload_row(conn, name)
            conn.execute(
                update(W)
                .where(W.c.id == row["id"])
                .values(reference=dumps({"files": files}), version=W.c.version + 1)
            )
            self.audit(conn, actor, "reference_set", name, {"files": len(files)}, now)
