"""Dashboard routes: fleet, workload pages, their live-refresh fragments, login, ack.

Authentication is the operator token, kept after login in an HttpOnly, SameSite=Strict cookie
(``Secure`` under TLS). State-changing forms (ack, logout) also require a same-origin
``Origin``/``Referer``, on top of SameSite, against cross-site request forgery.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from bam.server import deps
from bam.server.auth import Operator
from bam.server.dashboard.svg import timeline
from bam.server.errors import ServerError
from bam.server.service import Service

router = APIRouter(prefix="/dashboard", include_in_schema=False)
Svc = Annotated[Service, Depends(deps.service)]

_STATIC = {"style.css": "text/css", "live.js": "text/javascript"}


def _ts(t: float | None) -> str:
    return "–" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    d = max(0.0, now - t)
    if d < 120:
        return f"{d:.0f} s ago"
    if d < 7200:
        return f"{d / 60:.0f} min ago"
    return f"{d / 3600:.1f} h ago"


_env = Environment(
    loader=PackageLoader("bam.server.dashboard", "templates"),
    autoescape=select_autoescape(["html"]),
    auto_reload=False,
)
_env.filters["ts"] = _ts
_env.filters["ago"] = _ago
_env.filters["urlencode"] = lambda s: quote(str(s), safe="")


def _render(name: str, **context: Any) -> HTMLResponse:
    return HTMLResponse(_env.get_template(name).render(**context))


async def _viewer(request: Request) -> Operator | None:
    try:
        return await deps.operator("viewer")(request)
    except ServerError as e:
        if e.status in (401, 403):
            return None
        raise


Viewer = Annotated[Operator | None, Depends(_viewer)]


def _login_redirect() -> RedirectResponse:
    return RedirectResponse("/dashboard/login", status_code=303)


def _same_origin(request: Request) -> None:
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        raise ServerError(403, "csrf", "form posts need an Origin or Referer header")
    host = urlsplit(origin).netloc
    if host != request.headers.get("host"):
        raise ServerError(403, "csrf", "cross-site form post refused")


@router.get("/static/{name}")
def static(name: str) -> Response:
    ctype = _STATIC.get(name)
    if ctype is None:
        raise ServerError(404, "not_found", f"no static file {name!r}")
    data = resources.files("bam.server.dashboard").joinpath("static", name).read_bytes()
    return Response(data, media_type=ctype, headers={"cache-control": "max-age=300"})


@router.get("/login", response_class=HTMLResponse)
def login_form() -> HTMLResponse:
    return _render("login.html", operator=None, error=None)


@router.post("/login", response_model=None)
async def login(request: Request, svc: Svc) -> Response:
    deps.check_failures(request)
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    op = await run_in_threadpool(svc.operator, token) if token else None
    if op is None:
        deps.record_failure(request)
        page = _render("login.html", operator=None, error="Unknown or revoked token.")
        page.status_code = 401
        return page
    resp = RedirectResponse("/dashboard", status_code=303)
    resp.set_cookie(
        deps.SESSION_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
        max_age=12 * 3600,
    )
    return resp


@router.post("/logout", response_model=None)
def logout(request: Request) -> Response:
    _same_origin(request)
    resp = RedirectResponse("/dashboard/login", status_code=303)
    resp.delete_cookie(deps.SESSION_COOKIE, path="/")
    return resp


def _fleet_context(svc: Service) -> dict[str, Any]:
    return {
        "workloads": svc.workloads(),
        "counts": svc.counts(),
        "policy_id": svc.active_policy().policy_id,
        "now": time.time(),
    }


@router.get("", response_class=HTMLResponse, response_model=None)
def fleet(op: Viewer, svc: Svc) -> Response:
    if op is None:
        return _login_redirect()
    return _render("fleet.html", operator=op, **_fleet_context(svc))


@router.get("/fleet.frag", response_class=HTMLResponse, response_model=None)
def fleet_fragment(op: Viewer, svc: Svc) -> Response:
    if op is None:
        return Response(status_code=401)
    return _render("_fleet.html", **_fleet_context(svc))


def _workload_context(svc: Service, name: str, op: Operator) -> dict[str, Any]:
    evidence = svc.evidence(name, limit=500)
    return {
        "w": svc.workload(name),
        "results": svc.results(name, limit=25),
        "evidence": evidence,
        "actions": svc.workload_actions(name),
        "audit": svc.audit_log(name, limit=50),
        "plot": timeline(evidence),
        "now": time.time(),
        "can_ack": op.role == "admin",
    }


@router.get("/workloads/{name}", response_class=HTMLResponse, response_model=None)
def workload_page(name: str, op: Viewer, svc: Svc) -> Response:
    if op is None:
        return _login_redirect()
    return _render("workload.html", operator=op, **_workload_context(svc, name, op))


@router.get("/workloads/{name}/frag", response_class=HTMLResponse, response_model=None)
def workload_fragment(name: str, op: Viewer, svc: Svc) -> Response:
    if op is None:
        return Response(status_code=401)
    return _render("_workload.html", **_workload_context(svc, name, op))


@router.post("/workloads/{name}/ack", response_model=None)
async def workload_ack(name: str, request: Request, op: Viewer, svc: Svc) -> Response:
    if op is None:
        return _login_redirect()
    _same_origin(request)
    op.require()  # admin only
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    note = (form.get("note") or [""])[0][:1000]
    await run_in_threadpool(svc.ack, name, op.actor, note)
    return RedirectResponse(f"/dashboard/workloads/{quote(name, safe='')}", status_code=303)
