"""``bam bench``: the group that speed benchmarks hang off; each prints JSON with ``--json``.

Benchmarks, not timed tests: the machines are shared and noisy, so figures are measured here,
side by side in one run, and reported as rates and ratios.
"""

from __future__ import annotations

import typer

from bam.cli import app as root

app = typer.Typer(
    help="Speed benchmarks (events/s, latency); print JSON with --json.", no_args_is_help=True
)
root.add_typer(app, name="bench")
