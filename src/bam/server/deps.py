"""FastAPI dependencies: the service, agent signatures, operator tokens, rate limits.

Operator tokens come as ``Authorization: Bearer bamop_…`` or, for the dashboard, in the
``bam_session`` cookie (HttpOnly, SameSite=Strict). Known tokens are cached for a few seconds
per process, so a revocation takes effect within ``_OPERATOR_CACHE_S`` on every replica.
Failed authentications are counted per client address; past the limit the address gets 429
before any database work.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from sqlalchemy import RowMapping
from starlette.concurrency import run_in_threadpool

from bam.server.auth import SIGNATURE_HEADER, Operator
from bam.server.errors import ServerError
from bam.server.ratelimit import TokenBuckets
from bam.server.service import Service

SESSION_COOKIE = "bam_session"
_OPERATOR_CACHE_S = 5.0


class Guards:
    """Per-process rate-limit state (token buckets) and the operator-token cache."""

    def __init__(self, operator_per_minute: int, failures_per_minute: int) -> None:
        self.operators = TokenBuckets(operator_per_minute)
        self.failures = TokenBuckets(failures_per_minute, burst=failures_per_minute)
        self.cache: dict[str, tuple[float, Operator]] = {}

    def check_failures(self, address: str) -> None:
        """429 for an address that failed authentication too often recently."""
        if self.failures.empty(address):
            raise ServerError(
                429,
                "too_many_failures",
                "too many failed authentications from this address; wait a minute",
                headers={"Retry-After": "60"},
            )

    def record_failure(self, address: str) -> None:
        self.failures.take(address)


def _service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


async def service(request: Request) -> Service:
    """The process's :class:`Service` (async: a sync dependency would cost a thread hop)."""
    return _service(request)


def _guards(request: Request) -> Guards:
    g: Guards = request.app.state.guards
    return g


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def check_failures(request: Request) -> None:
    """429 for an address that failed authentication too often recently."""
    _guards(request).check_failures(client_address(request))


def record_failure(request: Request) -> None:
    _guards(request).record_failure(client_address(request))


async def agent(request: Request) -> RowMapping:
    """The enrolled agent whose pinned key signed this request."""
    check_failures(request)
    body = await request.body()
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    try:
        return await run_in_threadpool(
            _service(request).authenticate_agent,
            request.headers.get(SIGNATURE_HEADER),
            request.method,
            path,
            body,
        )
    except ServerError as e:
        if e.status == 401:
            record_failure(request)
        raise


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.cookies.get(SESSION_COOKIE)


async def _operator(request: Request) -> Operator:
    check_failures(request)
    token = _bearer(request)
    if token is None:
        raise ServerError(401, "auth_required", "an operator token is required (Bearer)")
    g = _guards(request)
    now = time.monotonic()
    hit = g.cache.get(token)
    if hit is not None and now - hit[0] < _OPERATOR_CACHE_S:
        op = hit[1]
    else:
        found = await run_in_threadpool(_service(request).operator, token)
        if found is None:
            record_failure(request)
            raise ServerError(401, "auth_invalid", "operator token is unknown or revoked")
        op = found
        if len(g.cache) > 10_000:
            g.cache.clear()
        g.cache[token] = (now, op)
    if not g.operators.take(op.name):
        raise ServerError(
            429,
            "rate_limited",
            f"operator {op.name!r} is over its rate limit",
            {"Retry-After": "1"},
        )
    return op


def operator(*roles: str) -> Callable[[Request], Awaitable[Operator]]:
    """A dependency admitting admin tokens and tokens of the given roles."""

    async def dep(request: Request) -> Operator:
        op = await _operator(request)
        op.require(*roles)
        return op

    return dep
