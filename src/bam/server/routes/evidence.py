"""``POST /v1/evidence``: verify, appraise and store one EAT; answer with the signed EAR.

Authenticated by the token itself (its signature by the agent's pinned key). The response
carries the result, the action, and the next nonce, so an agent in steady state needs one
round trip per evidence.

It is the one request agents send continuously, so besides the FastAPI route (which documents
it in OpenAPI and serves it when the app is mounted without middleware) it has a lean ASGI
path, :class:`EvidenceEndpoint`, installed as middleware: it parses the body once with
orjson, checks its one member itself, and writes the response bytes once, skipping
FastAPI's routing, dependency solving and pydantic validation of the request and the response
(about a millisecond of CPU per request here). Both paths share :func:`submit` (and
:func:`submit_batch` for ``POST /v1/evidence/batch``); the body size limit, security headers,
latency metrics and error bodies of the app apply to both. orjson rather than ``json`` here:
a batch's body is ~70 kB and its answer ~13 kB, which ``json`` parses and writes ~5x slower
(about 0.2 ms of CPU per batch).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request, Response

from bam.server import deps, metrics
from bam.server.errors import ServerError
from bam.server.schemas import EvidenceBatchIn, EvidenceBatchOut, EvidenceIn, EvidenceOut
from bam.server.service import EvidenceOutcome, Service
from bam.server.service.evidence_batch import MAX_BATCH

router = APIRouter(prefix="/v1", tags=["agents"])

PATH = "/v1/evidence"
BATCH_PATH = "/v1/evidence/batch"
MIN_TOKEN, MAX_TOKEN = 16, 1 << 20  # as EvidenceIn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
T = TypeVar("T")


async def _received(
    guards: deps.Guards, address: str, tokens: int, call: Callable[[], Awaitable[T]]
) -> T:
    """Run ``call`` for ``tokens`` received tokens: the failed-authentication guard and the
    received/rejected counters shared by both evidence routes."""
    guards.check_failures(address)
    metrics.EVIDENCE_RECEIVED.inc(tokens)
    try:
        return await call()
    except ServerError as e:
        metrics.EVIDENCE_REJECTED.labels(e.reason).inc(tokens)
        if e.status == 401:
            guards.record_failure(address)
        raise


async def submit(svc: Service, guards: deps.Guards, address: str, token: str) -> bytes:
    """Submit ``token``; the JSON response body. Counts metrics and failed authentications."""
    t0 = time.perf_counter()
    out = await _received(guards, address, 1, lambda: svc.submit_evidence_async(token))
    metrics.EVIDENCE_SECONDS.observe(time.perf_counter() - t0)
    if out.duplicate:
        metrics.EVIDENCE_DUPLICATE.inc()
    else:
        metrics.EVIDENCE_VERIFIED.inc()
        metrics.DECISIONS.labels(out.result["status"], out.result["action"]).inc()
    return response_body(out, svc.settings.nonce_ttl_s)


async def submit_batch(svc: Service, guards: deps.Guards, address: str, tokens: list[str]) -> bytes:
    """Submit one agent's ``tokens`` (see :mod:`bam.server.service.evidence_batch`)."""
    items = await _received(
        guards, address, len(tokens), lambda: svc.submit_evidence_batch_async(tokens)
    )
    ttl = svc.settings.nonce_ttl_s
    docs: list[dict[str, Any]] = []
    rejected: Counter[str] = Counter()
    decisions: Counter[tuple[str, str]] = Counter()
    duplicates = 0
    for item in items:
        if isinstance(item, ServerError):
            rejected[item.reason] += 1
            docs.append({"status": item.status, "reason": item.reason, "message": item.message})
            continue
        if item.duplicate:
            duplicates += 1
        else:
            decisions[(item.result["status"], item.result["action"])] += 1
        docs.append({"status": 200, "evidence": response_doc(item, ttl)})
    # one metrics update per kind, not per token
    for reason, n in rejected.items():
        metrics.EVIDENCE_REJECTED.labels(reason).inc(n)
    if duplicates:
        metrics.EVIDENCE_DUPLICATE.inc(duplicates)
    if decisions:
        metrics.EVIDENCE_VERIFIED.inc(sum(decisions.values()))
    for (status, action), n in decisions.items():
        metrics.DECISIONS.labels(status, action).inc(n)
    return orjson.dumps({"items": docs})


def response_body(out: EvidenceOutcome, ttl_s: float) -> bytes:
    """The :class:`~bam.server.schemas.EvidenceOut` document, serialised once."""
    return orjson.dumps(response_doc(out, ttl_s))


def response_doc(out: EvidenceOutcome, ttl_s: float) -> dict[str, Any]:
    """The :class:`~bam.server.schemas.EvidenceOut` document."""
    r = out.result
    nxt = None
    if out.next_nonce is not None:
        nxt = {
            "nonce": out.next_nonce[0],
            "expires_at": float(out.next_nonce[1]),
            "ttl_s": float(ttl_s),
        }
    body = {
        "evidence_id": out.evidence_id,
        "digest": out.digest,
        "seq": out.seq,
        "duplicate": out.duplicate,
        "result": {
            "id": r["id"],
            "workload": r["workload"],
            "status": r["status"],
            "action": r["action"],
            "reasons": list(r["reasons"]),
            "trust_vector": {k: int(v) for k, v in r["trust_vector"].items()},
            "policy_id": r["policy_id"],
            "policy_version": r["policy_version"],
            "trigger": r["trigger"],
            "created_at": float(r["created_at"]),
            "evidence_id": r["evidence_id"],
            "ear": r["ear"],
        },
        "next_challenge": nxt,
    }
    return body


@router.post("/evidence", response_model=EvidenceOut)
async def submit_evidence(
    body: EvidenceIn, request: Request, svc: Annotated[Service, Depends(deps.service)]
) -> Response:
    """Submit evidence; idempotent for retries of the same token, replays rejected."""
    guards: deps.Guards = request.app.state.guards
    data = await submit(svc, guards, deps.client_address(request), body.token)
    return Response(data, media_type="application/json")


@router.post("/evidence/batch", response_model=EvidenceBatchOut)
async def submit_evidence_batch(
    body: EvidenceBatchIn, request: Request, svc: Annotated[Service, Depends(deps.service)]
) -> Response:
    """Submit several tokens of one agent's chain, in order, each over its own nonce.

    Each token is verified and appraised as if sent alone; one answer per token. Processing
    stops at the first rejected token (the ones after it: 424 ``batch_aborted``).
    """
    guards: deps.Guards = request.app.state.guards
    data = await submit_batch(svc, guards, deps.client_address(request), body.tokens)
    return Response(data, media_type="application/json")


class _Route:
    """What the latency metric reads from ``scope["route"]`` (the route template)."""

    path = PATH


class _BatchRoute:
    path = BATCH_PATH


class EvidenceEndpoint:
    """Pure ASGI middleware answering ``POST /v1/evidence`` itself (see the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] not in (PATH, BATCH_PATH)
            or scope["method"] != "POST"
        ):
            await self.app(scope, receive, send)
            return
        batch = scope["path"] == BATCH_PATH
        scope["route"] = _BatchRoute if batch else _Route
        state = scope["app"].state
        client = scope.get("client")
        address = client[0] if client else "unknown"
        try:
            body = await _body(receive)
            if body is None:
                return  # the client went away: nobody to answer
            if batch:
                tokens = _tokens(scope, body)
                data = await submit_batch(state.service, state.guards, address, tokens)
            else:
                data = await submit(state.service, state.guards, address, _token(scope, body))
        except ServerError as e:
            payload = {"reason": e.reason, "message": e.message}
            await _respond(send, e.status, json.dumps(payload).encode(), e.headers)
            return
        await _respond(send, 200, data)


async def _body(receive: Receive) -> bytes | None:
    """The whole request body (``None``: the client disconnected first)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _token(scope: Scope, body: bytes) -> str:
    """``body``'s token, checked as :class:`EvidenceIn` would (same reason code)."""
    return _check_token(_object(scope, body, "token").get("token"), "body.token")


def _tokens(scope: Scope, body: bytes) -> list[str]:
    """``body``'s tokens, checked as :class:`EvidenceBatchIn` would."""
    tokens = _object(scope, body, "tokens").get("tokens")
    if not isinstance(tokens, list):
        raise ServerError(422, "request_invalid", "body.tokens: a list is required")
    if not 1 <= len(tokens) <= MAX_BATCH:
        raise ServerError(422, "request_invalid", f"body.tokens: must have 1 to {MAX_BATCH} items")
    return [_check_token(t, f"body.tokens.{i}") for i, t in enumerate(tokens)]


def _object(scope: Scope, body: bytes, member: str) -> dict[str, Any]:
    """``body`` as a JSON object whose only member is ``member`` (checked, not required)."""
    content_type = b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.split(b";", 1)[0].strip().lower()
    if content_type and content_type != b"application/json" and not content_type.endswith(b"+json"):
        raise ServerError(422, "request_invalid", "body: must be JSON (application/json)")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ServerError(422, "request_invalid", "body: JSON decode error") from None
    if not isinstance(doc, dict):
        raise ServerError(422, "request_invalid", 'body: must be an object {"token": ...}')
    extra = sorted(k for k in doc if k != member)
    if extra:
        raise ServerError(
            422, "request_invalid", f"body.{extra[0]}: Extra inputs are not permitted"
        )
    return doc


def _check_token(token: Any, where: str) -> str:
    if not isinstance(token, str):
        raise ServerError(422, "request_invalid", f"{where}: a string is required")
    if not MIN_TOKEN <= len(token) <= MAX_TOKEN:
        raise ServerError(
            422,
            "request_invalid",
            f"{where}: must have {MIN_TOKEN} to {MAX_TOKEN} characters",
        )
    return token


async def _respond(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for k, v in (headers or {}).items():
        raw.append((k.lower().encode("latin-1"), v.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
