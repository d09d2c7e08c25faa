"""``bam baseline``: learn a workload's normal behaviour from recorded traces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bam.cli import app as root
from bam.cli._common import console, print_json, user_errors
from bam.errors import BamError

app = typer.Typer(help="Fit and inspect baselines of normal behaviour.", no_args_is_help=True)
root.add_typer(app, name="baseline")

FORMAT_HELP = "Trace format: adfa, strace, lidds or bam (BAM recordings)."


@app.command("fit")
def fit(
    traces: Annotated[list[Path], typer.Argument(help="Normal traces (files or folders).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the model.")],
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "strace",
    detector: Annotated[
        str,
        typer.Option(
            help="lm, catlm, hmm, stide, t-stide, gmm or ensemble; "
            "append +set (e.g. catlm+set) to also score syscall-set novelty."
        ),
    ] = "lm",
    target_far: Annotated[
        float, typer.Option(help="Target false-alarm rate for the calibrated thresholds.")
    ] = 0.01,
    window: Annotated[int, typer.Option(help="Frame length in calls for local scoring.")] = 200,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Fit a baseline on normal traces and calibrate its thresholds on held-out normal data."""
    from bam.detect.baseline import make_baseline
    from bam.traces import read_traces

    with user_errors():
        try:
            base = make_baseline(detector, window=window, target_far=target_far)
        except ValueError as e:
            raise BamError(str(e)) from None
        data = list(read_traces(fmt, traces))
        if not data:
            raise BamError("no traces found in the given paths")
        base.fit(data)
        model_id = base.save(output)
    out = {
        "model": str(output),
        "model_id": model_id,
        "detector": base.detector.name,
        "traces": len(data),
        "calls_fitted": base.n_fit_calls_,
        "thresholds": base.thresholds(),
        "calibration": base.calibration_,
    }
    if json_out:
        print_json(out)
    else:
        console.print(f"[green]baseline written[/] {output}  ({base.detector.name})")
        console.print(f"model_id {model_id}")


@app.command("show")
def show(
    model: Annotated[Path, typer.Argument(help="A saved baseline.")],
    expect_model_id: Annotated[
        str | None, typer.Option(help="Refuse the model unless it has this model_id.")
    ] = None,
) -> None:
    """Print a baseline's id, detector, thresholds and update history (JSON)."""
    from bam.detect import Baseline

    with user_errors():
        b = Baseline.load(model, expect_model_id)
    print_json(
        {
            "model_id": b.model_id_,
            "detector": b.detector.name,
            "params": b.detector.get_params(),
            "window": b.window,
            "target_far": b.target_far,
            "thresholds": b.thresholds(),
            "calibration": b.calibration_,
            "history": b.history_,
        }
    )
