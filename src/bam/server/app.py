"""The FastAPI application: routes, error bodies, size limit, security headers, lifespan.

Errors: every failure is ``{"reason": ..., "message": ...}`` with a 4xx/5xx status — a
:class:`ServerError`, a validation error (``request_invalid``), an unknown route
(``not_found``), an oversized body (``body_too_large``) or, for bugs, ``internal_error``
with no stack trace (the trace goes to the server log only).

The request size limit is enforced on the byte stream (not only on Content-Length), before any
handler or body parser sees the data.
"""

from __future__ import annotations

import gc
import html
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bam import __version__
from bam.server import deps, metrics
from bam.server.auth import Operator
from bam.server.errors import ServerError
from bam.server.service import Service
from bam.server.settings import ServerSettings

log = logging.getLogger("bam.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class _TooLarge(HTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body reader passes it through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


def _error_body(status: int, reason: str, message: str) -> bytes:
    import json

    return json.dumps({"reason": reason, "message": message}).encode()


class EdgeMiddleware:
    """Pure ASGI: body size limit, latency metrics, security headers (no per-request task)."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status_holder = [0]
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_body
                except ValueError:
                    too_big = True
                if too_big:
                    await self._reject(send)
                    self._observe(scope, 413, t0)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _TooLarge(self.max_body)
            return message

        started = False
        is_html = scope["path"].startswith("/dashboard") or scope["path"] == "/docs"

        async def wrapped_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status_holder[0] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                if is_html:
                    headers.append((b"content-security-policy", _CSP.encode()))
                    headers.append((b"x-frame-options", b"DENY"))
                if not any(k == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, limited_receive, wrapped_send)
        except _TooLarge:
            if not started:
                await self._reject(send)
            status_holder[0] = 413
        self._observe(scope, status_holder[0], t0)

    def _observe(self, scope: Scope, status: int, t0: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        metrics.REQUEST_SECONDS.labels(path, f"{status // 100}xx").observe(time.perf_counter() - t0)

    async def _reject(self, send: Send) -> None:
        body = _error_body(413, "body_too_large", f"request body larger than {self.max_body} bytes")
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _json_error(
    status: int, reason: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"reason": reason, "message": message}, status_code=status, headers=headers)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(_: Request, exc: ServerError) -> JSONResponse:
        return _json_error(exc.status, exc.reason, exc.message, exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = []
        for err in errors[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        return _json_error(422, "request_invalid", "; ".join(parts) + more)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        reasons = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        reason = reasons.get(exc.status_code, f"http_{exc.status_code}")
        return _json_error(exc.status_code, reason, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json_error(
            500, "internal_error", "internal server error (details in the server log)"
        )


def _sweeper(svc: Service, stop: threading.Event) -> None:
    """Mark stale workloads every ``stale_check_s`` (each replica; CAS makes it safe)."""
    while not stop.wait(svc.settings.stale_check_s):
        try:
            marked = svc.sweep()
            if marked:
                metrics.STALE.inc(len(marked))
                log.info("stale: %s", ", ".join(marked))
        except Exception:  # keep sweeping; the next round retries
            log.exception("stale sweep failed")


def _freeze_startup_heap() -> None:
    """Keep what start-up built (app, routes, schemas, engine, policy) out of the cyclic GC.

    Every evidence allocates a few hundred short-lived objects (its claims' models), so the
    collector runs often, and each full collection walks every object the process holds —
    hundreds of thousands after FastAPI, pydantic, SQLAlchemy and the policy engine load,
    none of which will ever be garbage. ``gc.freeze()`` moves them to a permanent generation
    that collections skip (the practice CPython documents for pre-fork servers).
    """
    gc.collect()
    gc.freeze()


def create_app(settings: ServerSettings | None = None, service: Service | None = None) -> FastAPI:
    """The ASGI app; builds its :class:`Service` (and migrates) at start-up unless given one."""
    settings = settings or (service.settings if service else ServerSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service or Service(settings)
        app.state.service = svc
        stop = threading.Event()
        thread = threading.Thread(target=_sweeper, args=(svc, stop), name="bam-stale", daemon=True)
        thread.start()
        _freeze_startup_heap()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            if service is None:
                svc.close()

    app = FastAPI(
        title="BAM attestation server",
        version=__version__,
        description="Verifier and relying-party API of BAM (see docs/server.md).",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.guards = deps.Guards(
        settings.operator_requests_per_minute, settings.auth_failures_per_minute
    )
    _install_handlers(app)

    from bam.server.dashboard.routes import router as dashboard_router
    from bam.server.routes import agents, evidence, operators

    app.include_router(agents.router)
    app.include_router(evidence.router)
    app.include_router(operators.router)
    app.include_router(operators.metrics_router)
    app.include_router(dashboard_router)

    viewer = Depends(deps.operator("viewer"))

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_json(_: Operator = viewer) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs(_: Operator = viewer) -> HTMLResponse:
        """A self-contained API reference (no CDN: the machine may have no internet)."""
        rows = []
        for path, ops in sorted(app.openapi().get("paths", {}).items()):
            for method, op in ops.items():
                summary = op.get("summary", "")
                desc = (op.get("description") or "").split("\n")[0]
                rows.append(
                    f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}"
                    f"</code></td><td>{html.escape(summary)}</td><td>{html.escape(desc)}</td></tr>"
                )
        page = (
            "<!doctype html><html><head><meta charset=utf-8><title>BAM API</title>"
            '<link rel=stylesheet href="/dashboard/static/style.css"></head><body>'
            f"<h1>BAM attestation server API {html.escape(__version__)}</h1>"
            '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a>. '
            "Guide: docs/server.md.</p><table><tr><th>method</th><th>path</th><th>summary</th>"
            f"<th>description</th></tr>{''.join(rows)}</table></body></html>"
        )
        return HTMLResponse(page)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        """Liveness for load balancers: the one unauthenticated route; reveals nothing."""
        return {"ok": True}

    # Inside EdgeMiddleware (added last = outermost): the size limit, headers and latency
    # metric apply to the lean evidence path too.
    app.add_middleware(evidence.EvidenceEndpoint)
    app.add_middleware(EdgeMiddleware, max_body=settings.max_body_bytes)
    return app
