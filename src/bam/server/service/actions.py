"""Actions for agents: what the policy ordered, fetched by the agent, outcome reported back."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import RowMapping, select, update

from bam.server.errors import ServerError
from bam.server.service.core import AC, ServiceCore, W
from bam.server.service.queries import action_out


class ActionsMixin(ServiceCore):
    """Agent-side view of actions and their outcome reports."""

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
            return [action_out(r) for r in rows]

    def report_action(self, agent: RowMapping, action_id: int, state: str, outcome: str) -> None:
        """Record what the agent did about an action (only the action's own agent may)."""
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
