"""Offline evaluation and benchmarks (``bam eval``, ``bam bench score``)."""
