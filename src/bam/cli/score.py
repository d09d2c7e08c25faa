"""``bam score``: judge traces against a saved baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bam.cli import app as root
from bam.cli._common import console, print_json, user_errors


@root.command("score")
def score(
    traces: Annotated[list[Path], typer.Argument(help="Traces to score (files or folders).")],
    model: Annotated[Path, typer.Option(help="Baseline written by `bam baseline fit`.")],
    fmt: Annotated[
        str, typer.Option("--format", help="Trace format: adfa, strace, lidds or bam.")
    ] = "strace",
    expect_model_id: Annotated[
        str | None, typer.Option(help="Refuse the model unless it has this model_id.")
    ] = None,
    top: Annotated[int, typer.Option(help="Contributing features to report.")] = 5,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Score each trace: anomalous at the calibrated threshold? severity, first anomaly, top features.

    Exits 0 whether or not anomalies are found; non-zero only on errors.
    """
    from bam.detect import Baseline
    from bam.traces import read_traces

    with user_errors():
        base = Baseline.load(model, expect_model_id)
        verdicts = [base.score_trace(t, top=top).as_dict() for t in read_traces(fmt, traces)]
    if json_out:
        print_json(verdicts)
        return
    t = Table(title=f"scored against {model.name} ({base.detector.name})")
    for col in ("trace", "score", "threshold", "anomalous", "severity", "top feature"):
        t.add_column(col)
    for v in verdicts:
        t.add_row(
            Path(v["trace"]).name,
            f"{v['score']:.3f}",
            f"{v['threshold']:.3f}",
            "[red]yes[/]" if v["anomalous"] else "no",
            v["severity"],
            v["top"][0]["feature"] if v["top"] else "",
        )
    console.print(t)
