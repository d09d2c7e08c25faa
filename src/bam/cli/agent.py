"""``bam agent``: the attester daemon (``run``) and a look at its local state (``status``).

Settings: ``--config FILE`` (TOML; also ``$BAM_AGENT_CONFIG``), ``BAM_AGENT_*`` environment,
then the options below (which win). SIGTERM/SIGINT stop it cleanly: sensors detach, actions
in force are undone (freeze, network rule) and the groups it made are removed — the last
state is in the spool and the server keeps the hold until an operator acknowledges it.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from bam.cli import app as root
from bam.cli._common import console, print_json, user_errors

app = typer.Typer(help="The BAM agent: profile, monitor, attest and enforce.", no_args_is_help=True)
root.add_typer(app, name="agent")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", dir_okay=False)
]


def _overrides(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


@app.command("run")
def run(
    config: ConfigOpt = None,
    server: Annotated[str | None, typer.Option("--server", help="Server URL.")] = None,
    token: Annotated[str | None, typer.Option("--token", help="Enrolment token.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Agent name.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="State directory.")] = None,
    interval: Annotated[float | None, typer.Option("--interval", help="Report every S s.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Do not verify TLS.")] = False,
    duration: Annotated[
        float | None, typer.Option("--duration", help="Stop after S seconds.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Log events as JSON lines.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Enrol (once), profile each target (or load its baseline), then monitor and attest."""
    from bam.agent.config import load_settings
    from bam.agent.runner import Agent

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with user_errors():
        kw = _overrides(
            server_url=server, enrol_token=token, name=name, data_dir=data_dir, interval_s=interval
        )
        if insecure:
            kw["tls_verify"] = False
        try:
            settings = load_settings(config, **kw)
        except (FileNotFoundError, ValueError) as e:
            from bam.errors import BamError

            raise BamError(f"agent settings: {e}") from None
        if not settings.targets:
            from bam.errors import BamError

            raise BamError("no targets configured: add [[targets]] to the config file")
        stop = threading.Event()

        def _stop(signum: int, frame: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

        def _event(e: dict[str, Any]) -> None:
            if e["type"] == "tick":
                return
            if json_out:
                print(json.dumps(e, default=str), flush=True)
            elif e["type"] in ("result", "action", "phase", "ended"):
                console.print(_describe(e), highlight=False)

        with Agent(settings, on_event=_event, stop_commands_on_close=True) as agent:
            agent.enrol(stop)
            agent.start_targets()
            agent.run(stop, duration_s=duration)
            if json_out:
                print(json.dumps({"type": "stats", **agent.stats()}), flush=True)


def _describe(e: dict[str, Any]) -> str:
    t = e["type"]
    if t == "result":
        return (
            f"{e['workload']}: seq {e['seq']} severity={e.get('severity')} → "
            f"{e.get('status')} / {e.get('action')} {', '.join(e.get('reasons') or [])}"
        )
    if t == "action":
        rec = e.get("record") or {}
        return (
            f"{e['workload']}: action {rec.get('action', e.get('action'))} verified={e.get('ok')}"
        )
    if t == "phase":
        return f"{e['workload']}: {e['phase']}"
    return f"{e.get('workload', '')}: {t}"


@app.command("status")
def status(
    config: ConfigOpt = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="State directory.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The agent's local state: enrolment, chain position, spool, last results."""
    from bam.agent.config import load_settings
    from bam.agent.spool import Spool

    with user_errors():
        settings = load_settings(config, **_overrides(data_dir=data_dir))
        db = settings.data_dir / "spool.db"
        if not db.exists():
            from bam.errors import BamError

            raise BamError(f"no agent state at {settings.data_dir} (has the agent run?)")
        sp = Spool(db)
        try:
            st = sp.chain_state()
            out = {
                "data_dir": str(settings.data_dir),
                "enrolled": sp.get_meta("enrolled"),
                "chain_seq": st.seq,
                "chain_prev": st.prev,
                "in_flight": sp.inflight() is not None,
                "spool_pending": sp.pending_count(),
                "spool_dropped": int(sp.get_meta("dropped", "0") or 0),
                "blocked": sp.get_meta("blocked") or None,
                "delivered": sp.delivered_log()[-10:],
            }
        finally:
            sp.close()
    if json_out:
        print_json(out)
    else:
        for k, v in out.items():
            if k != "delivered":
                console.print(f"[bold]{k}[/]: {v}")
