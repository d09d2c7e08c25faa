"""``bam classifier``: train, inspect and apply the attack classifier.

The classifier says what an anomaly looks like (an attack family, or benign-looking); the
baseline says *that* behaviour is anomalous. It is trained on labelled traces: benign runs
and runs of known attacks, e.g. recordings (``bam record``) or strace logs of your own
workload, or ADFA-LD's layout. Saved as JSON + npz with a sha256 ``model_id`` (no pickle);
an agent given the file (``classifier = PATH`` in a target) puts the label and probability
into its evidence and the ``model_id`` into its measurements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bam.cli import app as root
from bam.cli._common import console, print_json, user_errors
from bam.errors import BamError

app = typer.Typer(help="Train and apply the attack classifier.", no_args_is_help=True)
root.add_typer(app, name="classifier")

FORMAT_HELP = "Trace format: adfa, strace, lidds or bam (BAM recordings)."


def _labelled(
    benign: list[Path], attack: list[str], fmt: str, adfa: Path | None
) -> tuple[list[Any], list[str]]:
    from bam.models.classifier import NORMAL
    from bam.traces import read_traces

    docs: list[Any] = []
    labels: list[str] = []
    if adfa is not None:
        from bam.traces.adfa import load_adfa_dataset

        data = load_adfa_dataset(adfa)
        for t in data.training + data.validation:
            docs.append(t)
            labels.append(NORMAL)
        for t in data.attack:
            docs.append(t)
            labels.append(t.label or "attack")
    for t in read_traces(fmt, benign):
        docs.append(t)
        labels.append(NORMAL)
    for spec in attack:
        family, sep, path = spec.partition("=")
        if not sep or not family or not path:
            raise BamError(f"--attack {spec!r}: expected FAMILY=PATH (e.g. reverse_shell=runs/)")
        if family == NORMAL:
            raise BamError(f"--attack: {NORMAL!r} is the benign class; use --benign for it")
        for t in read_traces(fmt, [Path(path)]):
            docs.append(t)
            labels.append(family)
    return docs, labels


@app.command("train")
def train(
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the model.")],
    benign: Annotated[
        list[Path] | None, typer.Option("--benign", help="Benign traces (file or folder).")
    ] = None,
    attack: Annotated[
        list[str] | None,
        typer.Option("--attack", help="FAMILY=PATH: traces of one attack family; repeatable."),
    ] = None,
    adfa: Annotated[
        Path | None, typer.Option("--adfa", help="An ADFA-LD folder (all three parts).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "strace",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Train on benign traces and labelled attack traces; write the model."""
    from bam.models.classifier import AttackClassifier

    with user_errors():
        docs, labels = _labelled(benign or [], attack or [], fmt, adfa)
        families = sorted(set(labels))
        if len(docs) < 4 or len(families) < 2:
            raise BamError(
                f"need benign and attack traces (got {len(docs)} traces, classes {families})"
            )
        clf = AttackClassifier(C=(1.0, 3.0, 10.0, 30.0))
        try:
            clf.fit(docs, labels)
        except ValueError as e:
            raise BamError(f"training failed: {e}") from None
        model_id = clf.save(output)
    out = {
        "model": str(output),
        "model_id": model_id,
        "classes": clf.classes_,
        "traces": {c: labels.count(c) for c in families},
        "C": clf.C_,
        "temperature": round(clf.temperature_, 4),
        "cv_scores": clf.cv_scores_,
        "features": clf.n_features_,
    }
    if json_out:
        print_json(out)
    else:
        console.print(f"[green]classifier written[/] {output}  model_id {model_id}")
        console.print(f"classes: {', '.join(clf.classes_)}; {clf.n_features_} features")


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Argument(help="A trained classifier.")],
    traces: Annotated[list[Path], typer.Argument(help="Traces to classify (files or folders).")],
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "strace",
    expect_model_id: Annotated[
        str | None, typer.Option("--expect-model-id", help="Refuse any other model file.")
    ] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Features to explain each with.")] = 3,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Label each trace: the most probable class, its probability, P(attack), why."""
    from bam.models.classifier import AttackClassifier
    from bam.traces import read_traces

    with user_errors():
        clf = AttackClassifier.load(model, expect_model_id=expect_model_id)
        data = list(read_traces(fmt, traces))
        if not data:
            raise BamError("no traces found in the given paths")
        proba = clf.predict_proba(data)
        attack = clf.attack_probability(proba)
        rows: list[dict[str, Any]] = []
        for t, p, a in zip(data, proba, attack, strict=True):
            k = int(p.argmax())
            rows.append(
                {
                    "trace": t.name,
                    "label": clf.classes_[k],
                    "probability": round(float(p[k]), 4),
                    "attack_probability": round(float(a), 4),
                    "top_features": [c.feature for c in clf.explain(t, top)] if top else [],
                }
            )
    if json_out:
        print_json({"model_id": clf.model_id_, "traces": rows})
        return
    for r in rows:
        console.print(
            f"{r['trace']}: [bold]{r['label']}[/] ({r['probability']:.2f}; "
            f"P(attack) {r['attack_probability']:.2f})  {'; '.join(r['top_features'])}"
        )
