"""``bam watch [--server URL] -- CMD ...``: the one-liner — start CMD, profile it, then attest it
continuously with a live view of scores, severity and decisions.

Without ``--server`` an embedded attestation server (SQLite in a temporary directory, uvicorn in a
thread of this process, loopback only) runs for the duration. Actions decided by the server's
policy are applied to CMD's process tree (``--no-enforce`` only shows them) and undone when
``bam watch`` exits, which also stops CMD.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any

import typer

from bam.cli import app as root
from bam.cli._common import console, user_errors

SPARK = " ▁▂▃▄▅▆▇█"
UNTIL_TOLD_S = 365 * 86400.0  # "until told": profiling ends on Enter / SIGUSR1, not on time


def _wait_enter(told: threading.Event) -> None:
    """Set ``told`` on each line typed on the terminal (Enter ends the profiling phase)."""
    for _ in sys.stdin:
        told.set()


def _spark(values: list[float], vmax: float = 10.0) -> str:
    return "".join(SPARK[min(8, int(8 * min(v, vmax) / vmax))] for v in values)


class View:
    """What the live view shows, updated from the agent's events."""

    def __init__(self, name: str, server: str) -> None:
        self.name = name
        self.server = server
        self.phase = "starting"
        self.calls = 0
        self.t0 = time.monotonic()
        self.values: deque[float] = deque(maxlen=60)
        self.level = "none"
        self.peak = 0.0
        self.evidence = 0
        self.last: dict[str, Any] = {}
        self.actions: list[str] = []
        self.log: deque[str] = deque(maxlen=8)

    def on_event(self, e: dict[str, Any]) -> None:
        t = e["type"]
        if t == "tick":
            self.calls += int(e.get("calls") or 0)
            self.phase = e.get("phase", self.phase)
            if self.phase == "monitoring":
                self.values.append(float(e.get("value") or 0.0))
                self.level = e.get("level") or "none"
                self.peak = float(e.get("peak") or 0.0)
        elif t == "phase":
            self.phase = e["phase"]
            self.log.append(f"{time.strftime('%H:%M:%S')} phase → {e['phase']}")
        elif t == "result":
            self.evidence += 1
            self.last = e
            if e.get("status") != "affirming":
                self.log.append(
                    f"{time.strftime('%H:%M:%S')} seq {e.get('seq')}: severity "
                    f"{e.get('severity')} → {e.get('status')} / {e.get('action')}"
                )
        elif t == "action":
            rec = e.get("record") or {}
            msg = f"{rec.get('action', e.get('action'))} (verified={e.get('ok')})"
            self.actions.append(msg)
            self.log.append(f"{time.strftime('%H:%M:%S')} ACTION {msg}")
        elif t == "ended":
            self.log.append(f"{time.strftime('%H:%M:%S')} command ended")

    def render(self) -> Any:
        from rich.panel import Panel
        from rich.table import Table

        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        el = time.monotonic() - self.t0
        colour = {"high": "red", "critical": "bold red", "medium": "yellow"}.get(
            self.level, "green"
        )
        t.add_row("workload", self.name)
        t.add_row("server", self.server)
        t.add_row("phase", self.phase)
        t.add_row("system calls", f"{self.calls:,} ({self.calls / max(el, 1e-9):,.0f}/s)")
        t.add_row("window score", f"{self.peak:.2f} × threshold")
        t.add_row("severity", f"[{colour}]{self.level}[/]")
        t.add_row("severity (60 ticks)", _spark(list(self.values)))
        t.add_row("evidence sent", str(self.evidence))
        if self.last:
            t.add_row(
                "last decision",
                f"{self.last.get('status')} / {self.last.get('action')} "
                f"{', '.join(self.last.get('reasons') or [])}",
            )
        t.add_row("actions", ", ".join(self.actions) or "-")
        for line in self.log:
            t.add_row("", line)
        return Panel(t, title="bam watch", subtitle="Ctrl-C to stop")


@root.command("watch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def watch(
    ctx: typer.Context,
    server: Annotated[
        str | None, typer.Option("--server", help="Server URL (default: embedded server).")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Enrolment token (with --server).")
    ] = None,
    profile: Annotated[float, typer.Option("--profile", help="Profiling time, s.")] = 30.0,
    until_told: Annotated[
        bool,
        typer.Option(
            "--until-told",
            help="Profile until you press Enter (or send SIGUSR1), not for --profile seconds.",
        ),
    ] = False,
    interval: Annotated[float, typer.Option("--interval", help="Attest every S s.")] = 5.0,
    duration: Annotated[
        float | None, typer.Option("--duration", help="Stop after S s in total.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Workload name.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Agent state (default: temporary).")
    ] = None,
    enforce: Annotated[
        bool, typer.Option("--enforce/--no-enforce", help="Apply the server's actions.")
    ] = True,
    insecure: Annotated[bool, typer.Option("--insecure", help="Do not verify TLS.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Events as JSON lines.")] = False,
) -> None:
    """Start CMD (after --), profile it, then attest it continuously with a live view."""
    from bam.agent.config import AgentSettings, TargetSpec
    from bam.agent.embedded import EmbeddedServer
    from bam.agent.runner import Agent
    from bam.errors import BamError

    cmd = list(ctx.args)
    with user_errors():
        if not cmd:
            raise BamError("no command given: bam watch [OPTIONS] -- CMD [ARGS...]")
        if server is not None and token is None and data_dir is None:
            raise BamError("--server needs --token (an enrolment token) or an enrolled --data-dir")
        wl = name or re.sub(r"[^A-Za-z0-9_.:-]", "_", Path(cmd[0]).name)[:60] or "workload"
        tmp = tempfile.TemporaryDirectory(prefix="bam-watch-")
        embedded: EmbeddedServer | None = None
        stop = threading.Event()
        told = threading.Event()
        signal.signal(signal.SIGINT, lambda s, f: stop.set())
        signal.signal(signal.SIGTERM, lambda s, f: stop.set())
        if until_told:
            signal.signal(signal.SIGUSR1, lambda s, f: told.set())
            if sys.stdin.isatty():
                threading.Thread(target=_wait_enter, args=(told,), daemon=True).start()
            profile = UNTIL_TOLD_S
        try:
            if server is None:
                embedded = EmbeddedServer(Path(tmp.name), in_process=True).start()
                server, token = embedded.url, embedded.enrol_token("bam watch")
            settings = AgentSettings(
                server_url=server,
                enrol_token=token,
                name=f"watch-{wl}",
                data_dir=data_dir or Path(tmp.name) / "agent",
                interval_s=interval,
                tls_verify=not insecure,
                apply_actions=enforce,
                targets=[TargetSpec(name=wl, command=cmd, profile_s=profile)],
            )
            view = View(wl, server)
            if embedded is not None:
                view.log.append(
                    f"dashboard {embedded.url}/dashboard (token {embedded.admin_token})"
                )

            def on_event(e: dict[str, Any]) -> None:
                if json_out:
                    if e["type"] != "tick":
                        print(json.dumps(e, default=str), flush=True)
                else:
                    view.on_event(e)

            with Agent(settings, on_event=on_event) as agent:
                agent.enrol(stop)
                agent.start_targets()
                if until_told:
                    view.log.append("profiling until told: press Enter or send SIGUSR1")
                with contextlib.ExitStack() as stack:
                    live = None
                    if not json_out:
                        from rich.live import Live

                        live = stack.enter_context(
                            Live(view.render(), console=console, refresh_per_second=4)
                        )
                    end = None if duration is None else time.monotonic() + duration
                    while not stop.is_set():
                        agent.run(stop, duration_s=0.25)
                        if told.is_set():
                            told.clear()
                            for st in agent.targets.values():
                                st.monitor.end_profiling_soon()
                        if live is not None:
                            live.update(view.render())
                        if all(s.ended for s in agent.targets.values()):
                            break
                        if end is not None and time.monotonic() >= end:
                            break
                stats = agent.stats()
            if json_out:
                print(json.dumps({"type": "stats", **stats}), flush=True)
            else:
                console.print(
                    f"agent: {stats['loop_cpu_fraction'] * 100:.1f}% of a core, "
                    f"{stats['peak_rss_mb']:.0f} MB RSS, {view.evidence} evidence sent"
                )
        finally:
            if embedded is not None:
                embedded.stop()
            tmp.cleanup()
