"""``bam eval``: offline evaluations on benchmark datasets (JSON with ``--json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bam.cli import app as root
from bam.cli._common import console, err_console, print_json, user_errors
from bam.errors import BamError

app = typer.Typer(help="Offline evaluations on benchmark datasets.", no_args_is_help=True)
root.add_typer(app, name="eval")


def resolve_adfa(path: Path | None) -> Path:
    from bam.evaluation.adfa import default_path

    p = path or default_path()
    if p is None:
        raise BamError("no ADFA-LD path given and ../shared/datasets/adfa-ld not found")
    return p


def run_adfa(
    path: Path | None, detectors: list[str], classifier: bool, quiet: bool
) -> dict[str, Any]:
    """Load ADFA-LD and evaluate, with a progress display on stderr unless ``quiet``."""
    from bam.evaluation.adfa import evaluate
    from bam.traces.adfa import load_adfa_dataset

    root_path = resolve_adfa(path)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
        transient=True,
    ) as prog:
        task = prog.add_task("loading ADFA-LD", total=None)
        data = load_adfa_dataset(root_path)

        def step(msg: str) -> None:
            prog.update(task, description=f"evaluating {msg}")
            if not quiet:
                err_console.print(f"[dim]… {msg}[/]")

        return evaluate(data, detectors, classifier=classifier, progress=step)


def print_adfa_table(result: dict[str, Any]) -> None:
    """Human-readable summary of an ADFA-LD evaluation."""
    t = Table(title="ADFA-LD, official split (fit on Training; Validation vs Attack)")
    for col in (
        "detector",
        "AUC",
        "FAR@90%",
        "TPR@1%",
        "TPR@5%",
        "flag FAR",
        "flag TPR",
        "fit s",
        "score s",
    ):
        t.add_column(col, justify="right" if col != "detector" else "left")
    for name, r in result["detectors"].items():
        t.add_row(
            f"{name} ({r['model']})",
            f"{r['auc']:.3f}",
            f"{r['far_at_90']:.3f}",
            f"{r['tpr_at_1']:.3f}",
            f"{r['tpr_at_5']:.3f}",
            f"{r['calibrated_far']:.3f}",
            f"{r['calibrated_tpr']:.3f}",
            f"{r['fit_s']:.1f}",
            f"{r['score_s']:.1f}",
        )
    console.print(t)
    c = result.get("classifier")
    if c:
        rd, lo = c["run_disjoint"], c["leave_one_type_out"]
        console.print(
            f"classifier: run-disjoint AUC [bold]{rd['auc']:.3f}[/], "
            f"leave-one-type-out mean AUC [bold]{lo['mean_auc']:.3f}[/] "
            + ", ".join(f"{k} {v:.3f}" for k, v in lo["per_type"].items())
        )


@app.command("adfa-ld")
def adfa_ld(
    path: Annotated[
        Path | None, typer.Argument(help="ADFA-LD folder (default: ../shared/datasets/adfa-ld).")
    ] = None,
    detectors: Annotated[
        str, typer.Option(help="Comma-separated detectors to evaluate.")
    ] = "lm,catlm,hmm,stide,t-stide,gmm,ensemble,catlm+set",
    classifier: Annotated[
        bool, typer.Option(help="Also evaluate the supervised classifier.")
    ] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Evaluate every detector (and the classifier) on ADFA-LD's official protocol."""
    from bam.detect.baseline import SET_SUFFIX
    from bam.models import DETECTORS

    with user_errors():
        names = [d.strip() for d in detectors.split(",") if d.strip()]
        bad = [d for d in names if d.removesuffix(SET_SUFFIX) not in DETECTORS]
        if bad:
            raise BamError(
                f"unknown detector(s) {', '.join(bad)}; expected {', '.join(DETECTORS)}"
                f" (each may end in {SET_SUFFIX!r}: with syscall-set novelty)"
            )
        result = run_adfa(path, names, classifier, quiet=False)
    if json_out:
        print_json(result)
    else:
        print_adfa_table(result)
