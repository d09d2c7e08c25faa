"""Operator and relying-party routes (Bearer operator tokens).

Roles: ``admin`` may do everything; ``viewer`` reads (workloads, results, evidence, audit,
metrics); ``relying`` may query the access gate.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from bam.server import deps, metrics
from bam.server.auth import Operator
from bam.server.schemas import (
    AccessOut,
    AckIn,
    ActionList,
    ActionOut,
    AgentList,
    AgentOut,
    AuditList,
    AuditOut,
    ChainResetOut,
    EnrolTokenIn,
    EnrolTokenOut,
    EvidenceList,
    EvidenceRow,
    IntelLoadOut,
    IntelRemoveOut,
    IntelSourceList,
    IntelSourceOut,
    OperatorTokenIn,
    OperatorTokenOut,
    PolicyIn,
    PolicyOut,
    ReferenceIn,
    ResultList,
    ResultOut,
    SecretIn,
    ServerKeyOut,
    WorkloadList,
    WorkloadName,
    WorkloadOut,
)
from bam.server.service import Service
from bam.server.service.intel import SOURCE_PATTERN

router = APIRouter(prefix="/v1", tags=["operators"])

Svc = Annotated[Service, Depends(deps.service)]
Admin = Annotated[Operator, Depends(deps.operator())]
Viewer = Annotated[Operator, Depends(deps.operator("viewer"))]
Relying = Annotated[Operator, Depends(deps.operator("relying", "viewer"))]


@router.get("/workloads", response_model=WorkloadList)
def list_workloads(_: Viewer, svc: Svc) -> WorkloadList:
    return WorkloadList(workloads=[WorkloadOut(**w) for w in svc.workloads()])


@router.get("/workloads/{workload}", response_model=WorkloadOut)
def get_workload(workload: WorkloadName, _: Viewer, svc: Svc) -> WorkloadOut:
    return WorkloadOut(**svc.workload(workload))


@router.get("/workloads/{workload}/results", response_model=ResultList)
def workload_results(
    workload: WorkloadName,
    _: Viewer,
    svc: Svc,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> ResultList:
    return ResultList(results=[ResultOut(**r) for r in svc.results(workload, limit)])


@router.get("/workloads/{workload}/evidence", response_model=EvidenceList)
def workload_evidence(
    workload: WorkloadName,
    _: Viewer,
    svc: Svc,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> EvidenceList:
    return EvidenceList(evidence=[EvidenceRow(**e) for e in svc.evidence(workload, limit)])


@router.get("/workloads/{workload}/actions", response_model=ActionList)
def workload_actions(workload: WorkloadName, _: Viewer, svc: Svc) -> ActionList:
    return ActionList(actions=[ActionOut(**a) for a in svc.workload_actions(workload)])


@router.post("/workloads/{workload}/ack", response_model=WorkloadOut)
def ack(workload: WorkloadName, body: AckIn, op: Admin, svc: Svc) -> WorkloadOut:
    """Acknowledge a contraindicated workload: releases the hold (audited)."""
    return WorkloadOut(**svc.ack(workload, op.actor, body.note))


@router.put("/workloads/{workload}/reference", status_code=204)
def set_reference(workload: WorkloadName, body: ReferenceIn, op: Admin, svc: Svc) -> None:
    """Reference values: measured files whose sha256 must match (else contraindicated)."""
    svc.set_reference(workload, dict(body.files), op.actor)


@router.put("/workloads/{workload}/secrets/{secret}", status_code=204)
def put_secret(workload: WorkloadName, secret: str, body: SecretIn, op: Admin, svc: Svc) -> None:
    """Store a secret released only to this workload while it is affirming and fresh."""
    svc.put_secret(workload, secret[:128], body.value, op.actor)


@router.get("/results/{result_id}", response_model=ResultOut)
def get_result(result_id: int, _: Viewer, svc: Svc) -> ResultOut:
    return ResultOut(**svc.result(result_id))


@router.get("/access/{workload}", response_model=AccessOut)
def access(workload: WorkloadName, _: Relying, svc: Svc) -> AccessOut:
    """The access gate: latest signed EAR and allow (affirming, fresh, not stale or held)."""
    return AccessOut(**svc.access(workload))


@router.post("/admin/enrol-tokens", response_model=EnrolTokenOut, status_code=201)
def create_enrol_token(body: EnrolTokenIn, op: Admin, svc: Svc) -> EnrolTokenOut:
    token, expires = svc.create_enrol_token(op.actor, body.note, body.ttl_s)
    return EnrolTokenOut(token=token, expires_at=expires)


@router.post("/admin/operator-tokens", response_model=OperatorTokenOut, status_code=201)
def create_operator_token(body: OperatorTokenIn, op: Admin, svc: Svc) -> OperatorTokenOut:
    token = svc.create_operator_token(body.name, body.role, op.actor)
    return OperatorTokenOut(name=body.name, role=body.role, token=token)


@router.get("/policy", response_model=PolicyOut)
def get_policy(_: Viewer, svc: Svc) -> PolicyOut:
    rows = svc.policy_rows(1)
    r = rows[0]
    return PolicyOut(
        policy_id=f"{r['name']}@v{r['version']}",
        name=r["name"],
        version=r["version"],
        sha256=r["sha256"],
        created_at=r["created_at"],
        created_by=r["created_by"],
        source=r["source"],
    )


@router.put("/policy", response_model=PolicyOut, status_code=201)
def set_policy(body: PolicyIn, op: Admin, svc: Svc) -> PolicyOut:
    """Validate and store a new policy version; a broken policy is refused with the Rego error."""
    pv, at = svc.set_policy(body.source, op.actor, body.name)
    return PolicyOut(
        policy_id=pv.policy_id,
        name=pv.name,
        version=pv.version,
        sha256=pv.sha256,
        created_at=at,
        created_by=op.actor,
    )


@router.get("/audit", response_model=AuditList)
def audit(
    _: Viewer,
    svc: Svc,
    workload: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditList:
    return AuditList(audit=[AuditOut(**a) for a in svc.audit_log(workload, limit)])


@router.get("/agents", response_model=AgentList)
def agents(_: Viewer, svc: Svc) -> AgentList:
    return AgentList(agents=[AgentOut(**a) for a in svc.agents()])


@router.post("/agents/{name}/reset-chain", response_model=ChainResetOut)
def reset_chain(
    name: Annotated[str, Path(min_length=1, max_length=128)], body: AckIn, op: Admin, svc: Svc
) -> ChainResetOut:
    """Let an agent that lost its chain state (``seq_replay``/``chain_broken``) start a new
    chain; its first token is reported to policy as ``chain_reset`` (audited)."""
    return ChainResetOut(**svc.reset_chain(name, op.actor, body.note))


IntelSource = Annotated[str, Path(min_length=1, max_length=128, pattern=SOURCE_PATTERN)]


@router.get("/intel", response_model=IntelSourceList)
def intel_sources(_: Viewer, svc: Svc) -> IntelSourceList:
    """Loaded threat-intelligence sources and how many file hashes each holds."""
    return IntelSourceList(sources=[IntelSourceOut(**r) for r in svc.intel_sources()])


@router.put("/intel/{source}", response_model=IntelLoadOut)
async def intel_load(source: IntelSource, request: Request, op: Admin, svc: Svc) -> IntelLoadOut:
    """Load a STIX 2.1 bundle (the request body) as ``source``, replacing what it held.

    Bundles larger than the request size limit are loaded with ``bam server intel load``."""
    body = await request.body()
    # parsing a bundle is CPU work and the write a transaction: off the event loop
    out = await run_in_threadpool(svc.load_intel, body, source, op.actor)
    return IntelLoadOut(**out)


@router.delete("/intel/{source}", response_model=IntelRemoveOut)
def intel_remove(source: IntelSource, op: Admin, svc: Svc) -> IntelRemoveOut:
    return IntelRemoveOut(source=source, removed=svc.remove_intel(source, op.actor))


@router.get("/server-key", response_model=ServerKeyOut)
def server_key(_: Relying, svc: Svc) -> ServerKeyOut:
    """The public key that signs EAR results."""
    k = svc.server_key
    return ServerKeyOut(kid=k.kid, alg=k.alg, jwk=k.jwk, pem=k.pem())


metrics_router = APIRouter(tags=["operators"])


@metrics_router.get("/metrics", response_class=Response)
def prometheus(_: Viewer) -> Response:
    """Prometheus exposition (viewer token: ``bearer_token`` in the scrape config)."""
    body, ctype = metrics.render()
    return Response(content=body, media_type=ctype)
