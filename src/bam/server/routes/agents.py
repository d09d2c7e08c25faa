"""Agent-facing routes: enrolment, workloads, challenges, actions, secret release.

Everything but enrolment is authenticated by the agent's pinned key (``BAM-Signature``);
enrolment by the one-time token plus a proof that the agent holds the key it registers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import RowMapping
from starlette.concurrency import run_in_threadpool

from bam.server import deps
from bam.server.errors import ServerError
from bam.server.schemas import (
    ActionList,
    ActionOut,
    ActionReportIn,
    ChallengeOut,
    EnrolIn,
    EnrolOut,
    SecretOut,
    WorkloadIn,
    WorkloadName,
    WorkloadOut,
)
from bam.server.service import Service
from bam.server.service.evidence import MAX_NONCES

router = APIRouter(prefix="/v1", tags=["agents"])

AgentRow = Annotated[RowMapping, Depends(deps.agent)]
Svc = Annotated[Service, Depends(deps.service)]


@router.post("/enrol", response_model=EnrolOut, status_code=201)
def enrol(body: EnrolIn, request: Request, svc: Svc) -> EnrolOut:
    """Register an agent's key with a one-time enrolment token (``bam server token create``)."""
    deps.check_failures(request)
    try:
        out = svc.enrol(
            body.token, body.name, dict(body.key), body.ak and dict(body.ak), body.proof
        )
    except ServerError as e:
        if e.status == 401:
            deps.record_failure(request)
        raise
    return EnrolOut(**out)


@router.post("/workloads", response_model=WorkloadOut)
def register_workload(body: WorkloadIn, agent: AgentRow, svc: Svc) -> WorkloadOut:
    """Register (or update) a workload this agent watches; idempotent."""
    return WorkloadOut(**svc.register_workload(agent, body.name, body.kind, body.interval_s))


@router.post("/challenge", response_model=ChallengeOut)
def challenge(
    agent: AgentRow, svc: Svc, count: Annotated[int, Query(ge=1, le=MAX_NONCES)] = 1
) -> ChallengeOut:
    """A single-use nonce for this agent's next evidence (expires within 60 s).

    ``count`` > 1 issues that many (``nonces``), one per token of a batch
    (``POST /v1/evidence/batch``).
    """
    issued = svc.challenge(agent, count)
    return ChallengeOut(
        nonce=issued[0][0],
        expires_at=issued[0][1],
        ttl_s=svc.settings.nonce_ttl_s,
        nonces=[n for n, _ in issued],
    )


@router.get("/actions", response_model=ActionList)
async def actions(
    agent: AgentRow,
    svc: Svc,
    after: Annotated[int, Query(ge=0)] = 0,
    wait: Annotated[float, Query(ge=0, le=120)] = 0.0,
) -> ActionList:
    """Actions for this agent's workloads with id > ``after``; long-polls up to ``wait`` s."""
    deadline = time.monotonic() + min(wait, svc.settings.long_poll_max_s)
    while True:
        rows = await run_in_threadpool(svc.actions_for, agent["id"], after)
        if rows or time.monotonic() >= deadline:
            return ActionList(actions=[ActionOut(**r) for r in rows])
        await asyncio.sleep(0.5)


@router.post("/actions/{action_id}/report", status_code=204)
def report_action(action_id: int, body: ActionReportIn, agent: AgentRow, svc: Svc) -> None:
    """The agent reports what it did about an action (recorded in the audit log)."""
    svc.report_action(agent, action_id, body.state, body.outcome)


@router.post("/workloads/{workload}/secrets/{secret}/release", response_model=SecretOut)
def release_secret(workload: WorkloadName, secret: str, agent: AgentRow, svc: Svc) -> SecretOut:
    """Release a stored secret to the workload's agent: only if affirming, fresh, not held."""
    value = svc.release_secret(agent, workload, secret)
    return SecretOut(workload=workload, name=secret, value=value)
