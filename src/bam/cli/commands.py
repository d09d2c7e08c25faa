"""Imports every command module so that each registers its commands on :data:`bam.cli.app`.

One line per module; a module adds its own Typer group or command.
"""

from bam.cli import (  # noqa: F401
    baseline,
    bench,
    bench_score,
    demo,
    evaluate,
    report,
    score,
)

# isort: off
from bam.cli import record  # noqa: F401
from bam.cli import bench_capture  # noqa: F401
from bam.cli import server  # noqa: F401
from bam.cli import bench_server  # noqa: F401
from bam.cli import bench_agent  # noqa: F401
from bam.cli import classifier  # noqa: F401
from bam.cli import vm  # noqa: F401
from bam.cli import agent  # noqa: F401
from bam.cli import watch  # noqa: F401
