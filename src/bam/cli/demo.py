"""``bam demo``: for now, the offline ADFA-LD evaluation with a progress display.

A later issue turns this into the live demo (agent, server, attack, isolation).
"""

from __future__ import annotations

from typing import Annotated

import typer

from bam.cli import app as root
from bam.cli._common import console, print_json, user_errors


@root.command("demo")
def demo(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Evaluate BAM's detectors and classifier on ADFA-LD and print a summary."""
    from bam.cli.evaluate import print_adfa_table, run_adfa
    from bam.evaluation.adfa import DEFAULT_DETECTORS

    console.print(
        "[bold]BAM demo[/] — learning normal behaviour from ADFA-LD's training traces, then "
        "scoring 4,372 unseen normal and 746 attack traces."
    )
    with user_errors():
        result = run_adfa(None, list(DEFAULT_DETECTORS), classifier=True, quiet=False)
    if json_out:
        print_json(result)
    else:
        print_adfa_table(result)
