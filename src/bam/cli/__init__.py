"""The ``bam`` command line: thin wrappers that parse, call the library, and print.

Each command group lives in its own module and is mounted here.
"""

from __future__ import annotations

import typer

from bam import __version__

app = typer.Typer(
    name="bam",
    help="BAM, the Behavioral Attestation Module: baseline, score, evaluate and attest behaviour.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """BAM command line."""


def _mount() -> None:
    # Each command group registers itself on ``app`` when imported.
    from bam.cli import commands  # noqa: F401


_mount()


def main() -> None:
    """Console-script entry point."""
    app()
