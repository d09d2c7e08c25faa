"""Shared CLI plumbing: one-line errors instead of tracebacks, and JSON output for scripts."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from bam.errors import BamError

err_console = Console(stderr=True)
console = Console()

T = TypeVar("T")


def _default(o: object) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def print_json(data: object) -> None:
    """Print ``data`` as JSON on stdout (numpy scalars and arrays converted)."""
    sys.stdout.write(json.dumps(data, default=_default, indent=2) + "\n")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn :class:`BamError` (bad input) into a red one-line message and exit code 2."""
    try:
        yield
    except BamError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """Let SIGTERM (``kill``, a CI timeout) unwind like Ctrl-C, so that ``with``/``finally``
    blocks run: a benchmark killed from outside then still stops the server processes and the
    throwaway PostgreSQL cluster it started, instead of leaving them running."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: stopped what was started", highlight=False)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(fn: Callable[[], T]) -> T:
    """Call ``fn`` with :func:`user_errors` around it."""
    with user_errors():
        return fn()
