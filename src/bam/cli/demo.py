"""``bam demo``: the live end-to-end demo (server, agent, flawed service, attack, isolation).

The offline ADFA-LD evaluation that used to run here is ``bam eval adfa-ld``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from bam.cli import app as root
from bam.cli._common import console, err_console, print_json, user_errors


@root.command("demo")
def demo(
    json_out: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Shorter profiling and benign phases (tests).")
    ] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="HTML report path.", dir_okay=False)
    ] = None,
    vm: Annotated[
        bool,
        typer.Option(
            "--vm",
            help="The service runs inside a QEMU guest (busybox httpd + CGI); the agent watches "
            "the VM (guest syscalls over virtio-serial + QEMU host resources) and isolates it "
            "over QMP (pause + link down).",
        ),
    ] = False,
) -> None:
    """Watch BAM learn a real service, attest it, catch a real attack and isolate it."""
    from bam.demo.run import Demo
    from bam.errors import BamError

    with user_errors():
        say = (lambda m: err_console.print(f"[dim]{m}[/]")) if json_out else console.print
        if vm:
            from bam.demo.vm import VmDemo

            outcome = VmDemo(quick=quick, report=report, say=say).run()
        else:
            if os.geteuid() != 0:
                raise BamError(
                    "the live demo needs root (eBPF sensor, cgroup freeze, nftables): run it "
                    "with sudo (`bam demo --vm` does not)"
                )
            outcome = Demo(quick=quick, report=report, say=say).run()
    if json_out:
        print_json(outcome)
    else:
        _print(outcome)
    ok = outcome["attack_detected"] and outcome["action_verified"] and not outcome["benign_alerts"]
    if not ok:
        raise typer.Exit(1)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _print(o: dict[str, Any]) -> None:
    from rich.table import Table

    ok = o["attack_detected"] and o["action_verified"] and o["benign_alerts"] == 0
    tl = Table(title="Timeline (t = seconds since start)")
    cols = ("t", "phase", "what", "score", "severity", "label", "decision", "action", "verified")
    for c in cols:
        tl.add_column(c)
    for row in o.get("timeline", []):
        sev = row.get("severity") or ""
        style = "bold red" if sev in ("high", "critical") or row.get("action") else None
        tl.add_row(*(_cell(row.get(c)) for c in cols), style=style)
    console.print(tl)
    t = Table(title="BAM demo outcome" + (" (VM)" if "vm" in o else ""), show_header=False)
    for k in (
        "benign_alerts",
        "attack_detected",
        "detection_latency_s",
        "decision",
        "evidence_verified",
        "action",
        "action_verified",
        "agent_cpu_overhead",
        "agent_rss_mb",
        "duration_s",
    ):
        t.add_row(k, str(o.get(k)))
    console.print(t)
    console.print(f"report: {o['report']}   dashboard (while running): {o['dashboard']}")
    console.print("[bold green]PASS[/]" if ok else "[bold red]NOT ALL CHECKS PASSED[/]")
