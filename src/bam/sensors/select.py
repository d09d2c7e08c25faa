"""Backend auto-selection: the best system-call sensor this host can run, and why.

Order: ``ebpf`` (in-kernel filter, ring buffer, ~2x on tiny syscalls, ~1x on real work),
``tracefs`` (kernel tracing ring, binary pages; needs root and tracefs), ``strace`` (ptrace:
works nearly everywhere, very slow). Each skipped backend is reported with the reason, so
``bam record`` can say *which* sensor ran and why the better ones did not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from bam.sensors.errors import SensorError, SensorUnavailableError

Backend = Literal["ebpf", "tracefs", "strace"]
BACKENDS: Final[tuple[Backend, ...]] = ("ebpf", "tracefs", "strace")


@dataclass
class Choice:
    """The chosen backend and, for each better one skipped, why."""

    backend: Backend
    skipped: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        why = "; ".join(f"{b}: {r}" for b, r in self.skipped.items())
        return f"{self.backend}" + (f" (skipped {why})" if why else "")


def _probe_ebpf() -> None:
    from bam.sensors import libbpf
    from bam.sensors.build import bpf_object

    libbpf.check_privilege()
    libbpf.check_btf()
    libbpf.lib()
    bpf_object()


def _probe_tracefs() -> None:
    from bam.sensors.tracefs import probe

    probe()


def _probe_strace() -> None:
    from bam.sensors.ptrace import strace_path

    strace_path()


_PROBES: Final[dict[Backend, Callable[[], None]]] = {
    "ebpf": _probe_ebpf,
    "tracefs": _probe_tracefs,
    "strace": _probe_strace,
}


def choose(preferred: str = "auto") -> Choice:
    """Pick a backend: ``preferred`` if given (failing loudly if it cannot run), else the
    first of :data:`BACKENDS` that can."""
    if preferred != "auto":
        if preferred not in BACKENDS:
            raise SensorError(
                f"unknown backend {preferred!r}; choose one of auto, {', '.join(BACKENDS)}"
            )
        _PROBES[preferred]()
        return Choice(preferred)
    skipped: dict[str, str] = {}
    for b in BACKENDS:
        try:
            _PROBES[b]()
        except SensorUnavailableError as e:
            skipped[b] = str(e)
            continue
        return Choice(b, skipped)
    raise SensorUnavailableError(
        "no system-call sensor can run here: " + "; ".join(f"{b}: {r}" for b, r in skipped.items())
    )
