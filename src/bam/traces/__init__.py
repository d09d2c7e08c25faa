"""Readers of recorded system-call traces, all yielding :class:`bam.events.Trace`."""

from bam.traces._registry import formats, read_traces, register
from bam.traces.adfa import AdfaDataset, load_adfa_dataset, read_adfa
from bam.traces.lidds import read_lidds
from bam.traces.recording import read_recording, write_recording
from bam.traces.strace import RET_UNKNOWN, parse_strace, read_strace

__all__ = [
    "RET_UNKNOWN",
    "AdfaDataset",
    "formats",
    "load_adfa_dataset",
    "parse_strace",
    "read_adfa",
    "read_lidds",
    "read_recording",
    "read_strace",
    "read_traces",
    "register",
    "write_recording",
]
