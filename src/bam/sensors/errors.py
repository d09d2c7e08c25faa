"""Sensor errors: each says what is missing or wrong and what to do about it.

They derive from :class:`bam.errors.BamError`, so the CLI prints one line and exits non-zero.
"""

from __future__ import annotations

from bam.errors import BamError


class SensorError(BamError):
    """A sensor cannot start or run (missing kernel feature, permission, tool, target)."""


class SensorUnavailableError(SensorError):
    """This backend cannot work on this host (no BTF, no tracefs, no strace, not root, ...).

    Backend auto-selection catches exactly this and tries the next backend.
    """


class TargetGoneError(SensorError):
    """The workload to watch does not exist (any more)."""
