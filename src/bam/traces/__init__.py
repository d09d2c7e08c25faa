"""Readers of recorded system-call traces, all yielding :class:`bam.events.Trace`."""

from bam.traces._registry import formats, read_traces, register
from bam.traces.adfa import AdfaDataset, load_adfa_dataset, read_adfa

__all__ = ["AdfaDataset", "formats", "load_adfa_dataset", "read_adfa", "read_traces", "register"]
