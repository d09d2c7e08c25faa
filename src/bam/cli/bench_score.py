"""``bam bench score``: detector scoring throughput on ADFA-LD (events/s, one core)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bam.cli._common import console, err_console, print_json, user_errors
from bam.cli.bench import app as bench_app
from bam.cli.evaluate import resolve_adfa


@bench_app.command("score")
def bench_score_cmd(
    path: Annotated[Path | None, typer.Argument(help="ADFA-LD folder.")] = None,
    detectors: Annotated[str, typer.Option(help="Comma-separated detectors.")] = (
        "lm,catlm,hmm,stide,t-stide,gmm,ensemble"
    ),
    repeat: Annotated[int, typer.Option(min=1, help="Repetitions; the best is kept.")] = 3,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Events per second scored by each detector, single process, BLAS on one thread."""
    from bam.evaluation.bench_score import bench_score
    from bam.traces.adfa import load_adfa_dataset

    with user_errors():
        data = load_adfa_dataset(resolve_adfa(path))
        names = [d.strip() for d in detectors.split(",") if d.strip()]
        result = bench_score(
            data, names, repeat, progress=lambda n: err_console.print(f"[dim]… {n}[/]")
        )
    if json_out:
        print_json(result)
        return
    t = Table(title=f"scoring {result['events']:,} ADFA-LD events, one core")
    for col in ("detector", "events/s (CPU)", "events/s (wall)", "with baseline frames"):
        t.add_column(col)
    for name, r in result["detectors"].items():
        t.add_row(
            name,
            f"{r['events_per_s']:,}",
            f"{r['events_per_s_wall']:,}",
            f"{r['baseline_events_per_s']:,}",
        )
    console.print(t)
