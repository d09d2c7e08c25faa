"""Prometheus metrics (``GET /metrics``).

Evidence received / verified / rejected (by reason), request latency per route, appraisal
latency, and policy decisions by status and action. With several uvicorn workers, set
``PROMETHEUS_MULTIPROC_DIR`` (``bam server run --workers N`` does it) so each worker writes its
samples to shared files and any worker can answer a scrape with the sum.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

EVIDENCE_RECEIVED = Counter("bam_evidence_received_total", "Evidence tokens received")
EVIDENCE_VERIFIED = Counter(
    "bam_evidence_verified_total", "Evidence tokens verified and stored (duplicates excluded)"
)
EVIDENCE_DUPLICATE = Counter(
    "bam_evidence_duplicate_total", "Retries of evidence already stored (answered, not stored)"
)
EVIDENCE_REJECTED = Counter(
    "bam_evidence_rejected_total", "Evidence tokens rejected, by reason", ["reason"]
)
EVIDENCE_SECONDS = Histogram(
    "bam_evidence_seconds", "Time to verify, appraise and store one evidence", buckets=_BUCKETS
)
REQUEST_SECONDS = Histogram(
    "bam_http_request_seconds",
    "HTTP request latency by route and status class",
    ["route", "status"],
    buckets=_BUCKETS,
)
DECISIONS = Counter(
    "bam_policy_decisions_total", "Appraisal results by status and action", ["status", "action"]
)
STALE = Counter("bam_workloads_stale_total", "Workloads marked stale")
SQLITE_COMMITS = Counter(
    "bam_sqlite_group_commits_total", "SQLite group commits (one transaction, many evidence)"
)
SQLITE_COMMIT_UNITS = Counter(
    "bam_sqlite_group_commit_units_total", "Evidence writes carried by SQLite group commits"
)
POLICY_CACHE = Counter(
    "bam_policy_cache_total", "Policy decisions answered from the cache or not", ["result"]
)


def observe_group_commit(units: int) -> None:
    """Count one SQLite group commit of ``units`` evidence writes."""
    SQLITE_COMMITS.inc()
    SQLITE_COMMIT_UNITS.inc(units)


def render() -> tuple[bytes, str]:
    """The exposition text (summed over workers in multi-process mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
