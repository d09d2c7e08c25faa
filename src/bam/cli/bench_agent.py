"""``bam bench agent``: the cost of watching a workload (slowdown, agent CPU and memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bam.cli._common import console, print_json, user_errors
from bam.cli.bench import app as bench_app


@bench_app.command("agent")
def agent_cmd(
    phase_s: Annotated[
        float, typer.Option("--phase-s", min=5, help="Seconds of each off / on / off phase.")
    ] = 20.0,
    profile_s: Annotated[
        float, typer.Option("--profile-s", min=2, help="The agent's profiling phase (s).")
    ] = 20.0,
    events_log: Annotated[
        Path | None, typer.Option("--events-log", help="Keep the agent's JSON event lines here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Run a fixed-work workload without, with, then again without a real agent watching it.

    Needs root (eBPF). Reports the workload's slowdown, its CPU per iteration, the agent's CPU
    share and peak resident memory while monitoring.
    """
    from bam.agent.bench import bench_agent

    with user_errors():
        res = bench_agent(phase_s=phase_s, profile_s=profile_s, events_log=events_log)
    if as_json:
        print_json(res)
        return
    t = Table(title="agent cost on a watched workload (side by side, one run)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("workload slowdown (median iteration, on / off)", f"{res['slowdown']:.3f}×")
    t.add_row("workload CPU per iteration (on / off)", f"{res['workload_cpu_ratio']:.3f}×")
    t.add_row("off phases (after / before)", f"{res['off_phases_ratio']:.3f}×")
    t.add_row("agent CPU while monitoring", f"{100 * res['agent_cpu_fraction']:.1f} %")
    t.add_row("agent peak RSS", f"{res['agent_rss_mb_peak']:.0f} MB")
    t.add_row("evidence results while on", str(res["evidence_results_while_on"]))
    console.print(t)
