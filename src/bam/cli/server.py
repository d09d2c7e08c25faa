"""``bam server``: run the attestation server and administer it from the server host.

Administration commands (tokens, policy, ack, workloads) work directly on the database named by
the settings (``BAM_DATABASE_URL`` or the embedded SQLite file), like ``keylime_tenant`` on a
verifier host; remote operators use the HTTP API with an operator token instead.
"""

from __future__ import annotations

import getpass
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from bam.cli import app as root
from bam.cli._common import console, print_json, user_errors

if TYPE_CHECKING:
    from bam.server.service import Service
    from bam.server.settings import ServerSettings

T = TypeVar("T")

app = typer.Typer(
    help="The attestation server: `bam server` runs it; subcommands administer it.",
    invoke_without_command=True,
)
token_app = typer.Typer(
    help="Enrolment tokens (for agents) and operator API tokens.", no_args_is_help=True
)
policy_app = typer.Typer(
    help="Rego appraisal policies (validated, versioned).", no_args_is_help=True
)
intel_app = typer.Typer(
    help="Threat intelligence: STIX 2.1 bundles whose file hashes evidence is checked against.",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")
app.add_typer(policy_app, name="policy")
app.add_typer(intel_app, name="intel")
root.add_typer(app, name="server")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105  (a file name)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


def _settings(**overrides: Any) -> ServerSettings:
    from bam.server.settings import ServerSettings

    return ServerSettings(**{k: v for k, v in overrides.items() if v is not None})


def _service(settings: ServerSettings | None = None) -> Service:
    from bam.server.service import Service

    return Service(settings or _settings())


def _read_input(file: Path, reason: str, limit: int) -> bytes:
    """An operator's input file, or a :class:`ServerError` ``reason`` naming it."""
    from bam.server.errors import ServerError

    try:
        if file.stat().st_size > limit:
            raise ServerError(422, reason, f"{file}: larger than {limit} bytes")
        return file.read_bytes()
    except OSError as e:
        raise ServerError(422, reason, f"{file}: {e.strerror or e}") from None


def _with_service(fn: Callable[[Service], T]) -> T:
    """``fn(service)`` with the service closed after it and its errors shown as user errors."""
    with user_errors():
        svc = _service()
        try:
            return fn(svc)
        finally:
            svc.close()


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


@app.callback()
def _default(ctx: typer.Context) -> None:
    """Without a subcommand: run the server (same as `bam server run`)."""
    if ctx.invoked_subcommand is None:
        run_cmd()


@app.command("init")
def init_cmd(
    tls: Annotated[
        bool, typer.Option("--tls/--no-tls", help="Make a CA and server certificate.")
    ] = True,
    name: Annotated[
        list[str] | None,
        typer.Option("--name", help="Server DNS name or IP for the certificate; repeatable."),
    ] = None,
    force_tls: Annotated[
        bool, typer.Option("--force-tls", help="Replace existing certificates.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create the database schema, the server signing key, TLS certificates and an admin token."""
    from bam.server.db.engine import current_revision
    from bam.server.tls import default_names, make_certificates

    with user_errors():
        settings = _settings()
        svc = _service(settings)
        info: dict[str, Any] = {
            "database": svc.engine.url.render_as_string(hide_password=True),
            "schema_revision": current_revision(svc.engine),
            "server_kid": svc.server_key.kid,
            "policy": svc.active_policy().policy_id,
        }
        if tls:
            if force_tls or not (settings.cert_path.exists() and settings.key_path.exists()):
                names = list(name or []) or default_names()
                paths = make_certificates(settings.tls_dir, names)
                info["tls"] = {k: str(v) for k, v in paths.items()}
                info["tls_names"] = names
            else:
                info["tls"] = {"cert": str(settings.cert_path), "ca": str(settings.ca_path)}
        token_path = settings.server_dir / ADMIN_TOKEN_FILE
        if not token_path.exists():
            token = svc.create_operator_token("admin", "admin", _actor())
            _write_secret(token_path, token)
            info["admin_token"] = token
        info["admin_token_file"] = str(token_path)
        svc.close()
    if as_json:
        print_json(info)
        return
    for k, v in info.items():
        console.print(f"{k:<18} {v}", highlight=False, soft_wrap=True)


@app.command("run")
def run_cmd(
    host: Annotated[str | None, typer.Option("--host", help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Listen port.")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="uvicorn workers.")
    ] = None,
    tls: Annotated[
        bool | None, typer.Option("--tls/--no-tls", help="Serve HTTPS (default: if certs exist).")
    ] = None,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request.")] = False,
) -> None:
    """Run the server (uvicorn); migrates the database first."""
    import uvicorn

    with user_errors():
        settings = _settings(host=host, port=port, workers=workers, tls=tls)
        n = settings.workers
        metrics_dir: str | None = None
        if n > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # the workers' shared metric files: ours, so removed when the server stops
            metrics_dir = tempfile.mkdtemp(prefix="bam-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        if tls is not None:
            os.environ["BAM_TLS"] = "true" if tls else "false"
        svc = _service(settings)  # migrate, key and default policy, once, before the workers
        svc.close()
        ssl: dict[str, Any] = {}
        if settings.use_tls:
            ssl = {"ssl_certfile": str(settings.cert_path), "ssl_keyfile": str(settings.key_path)}
        scheme = "https" if ssl else "http"
        console.print(
            f"bam server on {scheme}://{settings.host}:{settings.port} "
            f"({n} worker{'s' if n > 1 else ''}, {settings.dialect})",
            highlight=False,
        )
    try:
        uvicorn.run(
            "bam.server.asgi:app_factory",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=n,
            log_level=settings.log_level,
            access_log=access_log,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=5,
            **ssl,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@token_app.command("create")
def token_create_cmd(
    note: Annotated[str, typer.Option("--note", help="What the token is for.")] = "",
    ttl: Annotated[
        float | None, typer.Option("--ttl", help="Lifetime, s (enrolment tokens).")
    ] = None,
    operator: Annotated[
        str | None, typer.Option("--operator", help="Create an operator API token of this name.")
    ] = None,
    role: Annotated[str, typer.Option("--role", help="admin, viewer or relying.")] = "viewer",
    as_json: JsonOpt = False,
) -> None:
    """Create a one-time enrolment token for an agent (or, with --operator, an API token)."""

    def create(svc: Service) -> dict[str, Any]:
        if operator is not None:
            token = svc.create_operator_token(operator, role, _actor())
            return {"kind": "operator", "name": operator, "role": role, "token": token}
        token, expires = svc.create_enrol_token(_actor(), note, ttl)
        return {"kind": "enrol", "token": token, "expires_at": expires}

    out = _with_service(create)
    if as_json:
        print_json(out)
    else:
        typer.echo(out["token"])


@token_app.command("revoke")
def token_revoke_cmd(name: Annotated[str, typer.Argument(help="Operator token name.")]) -> None:
    """Revoke an operator API token."""
    _with_service(lambda svc: svc.revoke_operator_token(name, _actor()))
    console.print(f"revoked {name}", highlight=False)


@policy_app.command("set")
def policy_set_cmd(
    file: Annotated[Path, typer.Argument(help="Rego module (package bam.policy).")],
    name: Annotated[str, typer.Option("--name", help="Policy name.")] = "bam",
    as_json: JsonOpt = False,
) -> None:
    """Validate FILE (compile + sample evaluation) and store it as the next policy version."""
    from bam.server.errors import ServerError

    with user_errors():
        try:
            source = _read_input(file, "policy_unreadable", 1 << 20).decode("utf-8")
        except UnicodeDecodeError:
            raise ServerError(422, "policy_unreadable", f"{file}: not UTF-8 text") from None
    pv, _ = _with_service(lambda svc: svc.set_policy(source, _actor(), name))
    out = {"policy_id": pv.policy_id, "version": pv.version, "sha256": pv.sha256}
    if as_json:
        print_json(out)
    else:
        console.print(f"stored {pv.policy_id} (sha256 {pv.sha256})", highlight=False)


@policy_app.command("show")
def policy_show_cmd(as_json: JsonOpt = False) -> None:
    """Print the policy in force."""
    pv = _with_service(lambda svc: svc.active_policy())
    if as_json:
        print_json({"policy_id": pv.policy_id, "sha256": pv.sha256, "source": pv.source})
    else:
        typer.echo(f"# {pv.policy_id} sha256 {pv.sha256}\n{pv.source}")


@policy_app.command("list")
def policy_list_cmd(as_json: JsonOpt = False) -> None:
    """List stored policy versions (newest first)."""
    keys = ("name", "version", "sha256", "created_at", "created_by")
    rows = [{k: r[k] for k in keys} for r in _with_service(lambda svc: svc.policy_rows())]
    if as_json:
        print_json({"policies": rows})
        return
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"]))
        console.print(
            f"{r['name']}@v{r['version']}  {when}  {r['created_by']}  {r['sha256'][:16]}",
            highlight=False,
        )


@intel_app.command("load")
def intel_load_cmd(
    file: Annotated[Path, typer.Argument(help="STIX 2.1 bundle (JSON).")],
    source: Annotated[
        str | None,
        typer.Option("--source", help="Feed name (default: the file name); replaces its hashes."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Load the SHA-256 file-hash indicators of a STIX 2.1 bundle (audited)."""
    from bam.server.intel import MAX_BUNDLE_BYTES

    name = source or file.stem
    with user_errors():
        data = _read_input(file, "intel_unreadable", MAX_BUNDLE_BYTES)
    out = _with_service(lambda svc: svc.load_intel(data, name, _actor()))
    if as_json:
        print_json(out)
        return
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(out["skipped"].items())) or "none"
    console.print(
        f"{name}: {out['hashes']} file hashes (replaced {out['replaced']}); skipped: {skipped}",
        highlight=False,
    )


@intel_app.command("list")
def intel_list_cmd(as_json: JsonOpt = False) -> None:
    """Loaded sources and their hash counts."""
    rows = _with_service(lambda svc: svc.intel_sources())
    if as_json:
        print_json({"sources": rows})
        return
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["loaded_at"]))
        console.print(
            f"{r['source']:<32} {r['hashes']:>8} hashes  {when}  {r['loaded_by']}",
            highlight=False,
        )


@intel_app.command("remove")
def intel_remove_cmd(source: Annotated[str, typer.Argument(help="Source name.")]) -> None:
    """Forget a source's indicators (audited)."""
    n = _with_service(lambda svc: svc.remove_intel(source, _actor()))
    console.print(f"removed {n} hashes of {source}", highlight=False)


@app.command("ack")
def ack_cmd(
    workload: Annotated[str, typer.Argument(help="Workload name.")],
    note: Annotated[str, typer.Option("--note", help="Why (kept in the audit log).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Acknowledge a contraindicated workload: releases its hold (audited)."""
    out = _with_service(lambda svc: svc.ack(workload, _actor(), note))
    if as_json:
        print_json(out)
    else:
        console.print(
            f"acknowledged {workload}: status {out['status']}, hold released", highlight=False
        )


@app.command("workloads")
def workloads_cmd(as_json: JsonOpt = False) -> None:
    """List workloads with their trust status."""
    rows = _with_service(lambda svc: svc.workloads())
    if as_json:
        print_json({"workloads": rows})
        return
    for w in rows:
        flags = (" held" if w["hold"] else "") + (" stale" if w["stale"] else "")
        console.print(
            f"{w['name']:<32} {w['status']:<16} {w['action']:<12} {w['agent_name']}{flags}",
            highlight=False,
        )


@app.command("reset-chain")
def reset_chain_cmd(
    name: Annotated[str, typer.Argument(help="Agent name.")],
    note: Annotated[str, typer.Option("--note", help="Why (kept in the audit log).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Let an agent that lost its chain state start a new chain (audited; its next token is
    reported to policy as chain_reset)."""
    out = _with_service(lambda svc: svc.reset_chain(name, _actor(), note))
    if as_json:
        print_json(out)
    else:
        console.print(
            f"reset the chain of {name} (was at seq {out['previous_seq']}): "
            "its next token starts a new chain",
            highlight=False,
        )


@app.command("revoke-agent")
def revoke_agent_cmd(name: Annotated[str, typer.Argument(help="Agent name.")]) -> None:
    """Revoke an agent: its key is no longer accepted."""
    _with_service(lambda svc: svc.revoke_agent(name, _actor()))
    console.print(f"revoked agent {name}", highlight=False)
