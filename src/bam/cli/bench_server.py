"""``bam bench server``: evidence per second and latency of the attestation server."""

from __future__ import annotations

from typing import Annotated

import typer

from bam.cli._common import console, print_json, terminated_as_interrupt, user_errors
from bam.cli.bench import app as bench_app


@bench_app.command("server")
def bench_server_cmd(
    agents: Annotated[
        int, typer.Option("--agents", min=1, help="Simulated agents (processes).")
    ] = 4,
    duration: Annotated[
        float, typer.Option("--duration", min=1, help="Measured seconds per run.")
    ] = 10.0,
    warmup: Annotated[
        float, typer.Option("--warmup", min=0, help="Unmeasured seconds first.")
    ] = 2.0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="uvicorn workers.")] = 2,
    database: Annotated[
        list[str] | None,
        typer.Option("--database", help="sqlite and/or postgresql (repeatable; default both)."),
    ] = None,
    tls: Annotated[
        bool, typer.Option("--tls/--no-tls", help="HTTPS between agents and server.")
    ] = False,
    batch: Annotated[
        list[int] | None,
        typer.Option(
            "--batch",
            help="Tokens per request, one per workload (repeatable; default 1 and 8: each "
            "database is run one token per request and in batches of 8).",
        ),
    ] = None,
    files: Annotated[
        list[str] | None,
        typer.Option(
            "--files",
            help="How tokens carry their 24 measured files: 'reference' (by digest once the "
            "server holds them, as agents send them) and/or 'full' (in every token); "
            "repeatable, default reference.",
        ),
    ] = None,
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds",
            min=1,
            help="Run every configuration this many times, interleaved; the summary gives "
            "medians (a shared machine's speed drifts between runs).",
        ),
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """N agent processes send real signed evidence over HTTP; report evidence/s, p50/p99, errors."""
    from bam.server.bench import bench_server

    with user_errors(), terminated_as_interrupt():
        result = bench_server(
            databases=database or ["sqlite", "postgresql"],
            agents=agents,
            duration_s=duration,
            warmup_s=warmup,
            workers=workers,
            tls=tls,
            batches=batch or [1, 8],
            rounds=rounds,
            files=files or ["reference"],
        )
    if as_json:
        print_json(result)
        return
    for run in result["runs"]:
        console.print(
            f"{run['database']:<11} agents {run['agents']:>3}  batch {run['batch']:>2}  "
            f"files {run['files']:<9}  "
            f"{run['evidence_per_s']:>8.1f} evidence/s  "
            f"p50 {run['p50_ms']:.1f} ms  p99 {run['p99_ms']:.1f} ms  errors {run['errors']}",
            highlight=False,
        )
    if rounds > 1:
        for s in result["summary"]:
            lo, hi = s["evidence_per_s_range"]
            console.print(
                f"{s['database']:<11} batch {s['batch']:>2}  files {s['files']:<9}  "
                f"median {s['evidence_per_s_median']:.1f}"
                f" evidence/s ({lo:.0f}-{hi:.0f} over {s['rounds']} rounds)  "
                f"p99 median {s['p99_ms_median']:.1f} ms, max {s['p99_ms_max']:.1f}  "
                f"errors {s['errors']}",
                highlight=False,
            )
