"""From a policy input to a stored result: decide, apply the hold, store with compare-and-set.

Shared by the two things that appraise a workload: evidence arriving
(:mod:`~bam.server.service.evidence`) and evidence failing to arrive
(:mod:`~bam.server.service.staleness`). The rule both keep: policy evaluation and EAR signing
happen before the write transaction, against a snapshot of the workload; the transaction
re-checks that snapshot (``version``) and the caller appraises again if it moved.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, RowMapping, bindparam, insert, update

from bam.server.ear import Appraisal
from bam.server.errors import PolicyError
from bam.server.policy import ACTION_RANK, Decision, evaluate
from bam.server.service.core import AC, R, W, dumps
from bam.server.service.policies import PoliciesMixin

log = logging.getLogger("bam.server")

_INS_RESULT = insert(R).returning(R.c.id)
_INS_ACTION = insert(AC)


class RetryError(Exception):
    """A compare-and-set lost a race; appraise again from fresh state."""


def hold_reason(since: float) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    return f"held: contraindicated since {when}, awaiting operator acknowledgement"


def next_hold(
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


def workload_input(wl: Mapping[Any, Any], *, stale: bool) -> dict[str, Any]:
    """The ``workload`` member of the policy input."""
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


def result_dict(
    appraisal: Appraisal, result_id: int, evidence_id: int | None, ear: str, now: float
) -> dict[str, Any]:
    """A stored result as the API shows it."""
    return {
        "id": result_id,
        "workload": appraisal.workload,
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


def action_audit(appraisal: Appraisal, previous: str, result_id: int, actor: str) -> dict[str, Any]:
    """The audit detail of an action change."""
    return {
        "action": appraisal.action,
        "previous": previous,
        "status": appraisal.status,
        "reasons": list(appraisal.reasons),
        "result_id": result_id,
        "trigger": appraisal.trigger,
        "by": actor,
    }


class AppraisalMixin(PoliciesMixin):
    """Policy decision plus hold, and the storing of a result."""

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
            reasons.append(hold_reason(wl["hold_since"] or now))
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
        """Insert the result (and action, audit), then move the workload with a version CAS.

        The general (SQLAlchemy) path, used for stale marks; evidence has its own plain-SQL
        path in :mod:`bam.server.db.hot` with the same rules.
        """
        reasons_json = dumps(list(appraisal.reasons))
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
        hold, hold_since, hold_action = next_hold(wl, appraisal, decision, now)
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
            raise RetryError
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
                action_audit(appraisal, wl["action"], result_id, actor),
                now,
            )
        return result_dict(appraisal, result_id, evidence_id, ear, now)


@functools.lru_cache(maxsize=8)
def _workload_cas(columns: tuple[str, ...]) -> Any:
    """``UPDATE workloads SET <columns> WHERE id = :wid AND version = :old`` (built once)."""
    return (
        update(W)
        .where(W.c.id == bindparam("wid"), W.c.version == bindparam("old"))
        .values({c: bindparam(c) for c in columns})
    )
