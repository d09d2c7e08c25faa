"""Imports every command module so that each registers its commands on :data:`bam.cli.app`.

One line per module; a module adds its own Typer group or command.
"""

from bam.cli import (
    bench,  # noqa: F401  (first: other modules add to the bench group)
    report,  # noqa: F401
)
