"""``POST /v1/evidence``: verify, appraise and store one EAT; answer with the signed EAR.

Authenticated by the token itself (its signature by the agent's pinned key). The response
carries the result, the action, and the next nonce, so an agent in steady state needs one
round trip per evidence.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from bam.server import deps, metrics
from bam.server.errors import ServerError
from bam.server.schemas import ChallengeOut, EvidenceIn, EvidenceOut, ResultOut
from bam.server.service import Service

router = APIRouter(prefix="/v1", tags=["agents"])


@router.post("/evidence", response_model=EvidenceOut)
def submit_evidence(
    body: EvidenceIn, request: Request, svc: Annotated[Service, Depends(deps.service)]
) -> Response:
    """Submit evidence; idempotent for retries of the same token, replays rejected."""
    deps.check_failures(request)
    metrics.EVIDENCE_RECEIVED.inc()
    t0 = time.perf_counter()
    try:
        out = svc.submit_evidence(body.token)
    except ServerError as e:
        metrics.EVIDENCE_REJECTED.labels(e.reason).inc()
        if e.status == 401:
            deps.record_failure(request)
        raise
    metrics.EVIDENCE_SECONDS.observe(time.perf_counter() - t0)
    if out.duplicate:
        metrics.EVIDENCE_DUPLICATE.inc()
    else:
        metrics.EVIDENCE_VERIFIED.inc()
        metrics.DECISIONS.labels(out.result["status"], out.result["action"]).inc()
    nxt = None
    if out.next_nonce is not None:
        nxt = ChallengeOut(
            nonce=out.next_nonce[0], expires_at=out.next_nonce[1], ttl_s=svc.settings.nonce_ttl_s
        )
    body_out = EvidenceOut(
        evidence_id=out.evidence_id,
        digest=out.digest,
        seq=out.seq,
        duplicate=out.duplicate,
        result=ResultOut(**out.result),
        next_challenge=nxt,
    )
    # Validated once above; returning a Response spares FastAPI validating it a second time.
    return Response(body_out.model_dump_json(), media_type="application/json")
