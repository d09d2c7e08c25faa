"""The evidence hot path as plain SQL on the pooled DB-API connection.

``POST /v1/evidence`` is the one request agents send continuously, so it skips SQLAlchemy's
per-statement machinery (execution contexts, result proxies, type processors: ~0.15 ms of CPU per
statement, most of an appraisal) and runs a handful of fixed statements on the DB-API cursor of
a connection checked out from the engine's pool. The statements are the same compare-and-set
and upsert rules as the rest of :mod:`bam.server.service`; only the client-side cost changes.

Per evidence: two reads (agent + duplicate + rate budget; workload + nonce), then one write
transaction (plus one read the first time a process meets a file list given by reference,
and one insert for a list given in full that is not known to be stored). On SQLite the writer holds the database lock (``BEGIN IMMEDIATE``) and every
statement is an in-process call, so the write transaction stays a sequence of simple
statements. On PostgreSQL every statement is a network round trip, so the write transaction is
two statements built from data-modifying CTEs:

* ``claim``: count the request against the rate limit, consume the nonce and move the agent's
  chain (compare-and-set on ``last_seq``, only if the nonce was consumed) — one statement;
* ``store``: insert the evidence and its result, move the workload (compare-and-set on
  ``version``) and issue the next nonce — one statement.

Each is all-or-nothing with the transaction: a lost compare-and-set, an exhausted rate limit or
a stale nonce rolls everything back.

Statements are written once with ``:name`` parameters (sqlite3's named style) and translated to
psycopg's ``%(name)s``; psycopg then prepares them server-side after a few executions.
"""

from __future__ import annotations

import re
from typing import Any

_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


def _cat(*parts: str) -> str:
    """Join constant SQL fragments (every value is a bound parameter, never text)."""
    return "".join(parts)


AGENT_COLUMNS = (
    "id",
    "name",
    "jwk",
    "ak_kid",
    "revoked_at",
    "last_seq",
    "last_digest",
    "last_nonce",
    "tpm_clock",
    "tpm_reset",
    "tpm_restart",
    "tpm_safe",
    "tpm_ak",
    "chain_epoch",
)
WORKLOAD_COLUMNS = (
    "id",
    "name",
    "agent_id",
    "kind",
    "interval_s",
    "reference",
    "status",
    "action",
    "severity",
    "hold",
    "hold_since",
    "hold_action",
    "stale",
    "version",
)

# Agent by key id, with the evidence id if this exact token is already stored for it (a retry)
# and the agent's request count in the current rate window (early 429, read only).
AGENT = _cat(
    "SELECT ",
    ", ".join(f"a.{c}" for c in AGENT_COLUMNS),
    ", (SELECT e.id FROM evidence e WHERE e.digest = :digest AND e.agent_id = a.id)",
    ', (SELECT c.count FROM rate_counters c WHERE c.subject = a.id AND c."window" = :window)',
    " FROM agents a WHERE a.kid = :kid",
)

# Workload by name, with the nonce's row (early, cheap replay/expiry rejection).
WORKLOAD = _cat(
    "SELECT ",
    ", ".join(f"w.{c}" for c in WORKLOAD_COLUMNS),
    ", n.agent_id, n.used_at, n.expires_at",
    " FROM workloads w LEFT JOIN nonces n ON n.nonce_hash = :h WHERE w.name = :name",
)

NONCE = "SELECT agent_id, used_at, expires_at FROM nonces WHERE nonce_hash = :h"

RATE_HIT = (
    'INSERT INTO rate_counters (subject, "window", count) VALUES (:agent, :window, 1)'
    ' ON CONFLICT (subject, "window") DO UPDATE SET count = rate_counters.count + 1'
    " RETURNING count"
)
USE_NONCE = (
    "UPDATE nonces SET used_at = :now WHERE nonce_hash = :h AND agent_id = :agent"
    " AND used_at IS NULL AND expires_at >= :now RETURNING issued_at"
)
_CHAIN_SET = (
    "UPDATE agents SET last_seq = :seq, last_digest = :digest, last_nonce = :nonce,"
    " last_evidence_at = :now, tpm_clock = :tpm_clock, tpm_reset = :tpm_reset,"
    " tpm_restart = :tpm_restart, tpm_safe = :tpm_safe, tpm_ak = :tpm_ak, refused_reason = NULL"
    " WHERE id = :agent AND last_seq = :old_seq AND chain_epoch = :epoch"
)
MOVE_CHAIN = _CHAIN_SET
_EVIDENCE_VALUES = (
    "INSERT INTO evidence (digest, agent_id, workload_id, chain_epoch, seq, iat, received_at,"
    " severity, label, score, window_end, token) VALUES (:digest, :agent, :wid, :epoch, :seq,"
    " :iat, :now, :severity, :label, :score, :window_end, :token)"
)
INSERT_EVIDENCE = _EVIDENCE_VALUES + " RETURNING id"
_RESULT_COLUMNS = (
    'INSERT INTO results (evidence_id, workload_id, created_at, "trigger", status, action,'
    " reasons, policy_id, policy_version, ear)"
)
INSERT_RESULT = (
    _RESULT_COLUMNS + " VALUES (:evidence_id, :wid, :now, :trigger, :status, :action,"
    " :reasons, :policy_id, :policy_version, :ear) RETURNING id"
)
_WORKLOAD_SET = (
    "UPDATE workloads SET status = :status, action = :action, hold = :hold,"
    " hold_since = :hold_since, hold_action = :hold_action, last_result_at = :now,"
    " version = :old + 1, stale = :stale, stale_since = NULL, last_evidence_at = :now,"
    " severity = :severity"
)
MOVE_WORKLOAD = _WORKLOAD_SET + ", last_result_id = :result_id WHERE id = :wid AND version = :old"
INSERT_NONCE = (
    "INSERT INTO nonces (nonce_hash, agent_id, issued_at, expires_at)"
    " VALUES (:next_h, :agent, :now, :next_expires)"
)
# A measured file list given in full for the first time (content-addressed; see MeasurementSet).
INSERT_FILES = (
    "INSERT INTO measurement_sets (sha256, files, created_at)"
    " VALUES (:files_sha256, :files_json, :now) ON CONFLICT (sha256) DO NOTHING"
)
FILES = "SELECT files FROM measurement_sets WHERE sha256 = :files_sha256"
INSERT_ACTION = (
    "INSERT INTO actions (workload_id, agent_id, result_id, action, reasons, created_at, state)"
    " VALUES (:wid, :agent, :result_id, :action, :reasons, :now, :state)"
)
INSERT_AUDIT = (
    "INSERT INTO audit (at, actor, event, workload, detail)"
    " VALUES (:now, :actor, :event, :workload, :detail)"
)

# PostgreSQL: the same writes as two statements (see the module docstring).
PG_CLAIM = _cat(
    "WITH rl AS (",
    RATE_HIT,
    "), n AS (",
    USE_NONCE,
    "), a AS (",
    _CHAIN_SET,
    " AND EXISTS (SELECT 1 FROM n) RETURNING 1)",
    " SELECT (SELECT count FROM rl), (SELECT issued_at FROM n), (SELECT count(*) FROM a)",
)
PG_STORE = _cat(
    "WITH e AS (",
    INSERT_EVIDENCE,
    "), r AS (",
    _RESULT_COLUMNS,
    " VALUES ((SELECT id FROM e), :wid, :now, :trigger, :status, :action, :reasons,",
    " :policy_id, :policy_version, :ear) RETURNING id), w AS (",
    _WORKLOAD_SET,
    ", last_result_id = (SELECT id FROM r) WHERE id = :wid AND version = :old RETURNING 1),",
    " nn AS (",
    INSERT_NONCE,
    ")",
    " SELECT (SELECT id FROM e), (SELECT id FROM r), (SELECT count(*) FROM w)",
)


class Statements:
    """The hot statements in the paramstyle of one dialect."""

    def __init__(self, dialect: str) -> None:
        self.postgresql = dialect == "postgresql"
        for name in (
            "AGENT",
            "WORKLOAD",
            "NONCE",
            "RATE_HIT",
            "USE_NONCE",
            "MOVE_CHAIN",
            "INSERT_EVIDENCE",
            "INSERT_RESULT",
            "MOVE_WORKLOAD",
            "INSERT_NONCE",
            "INSERT_FILES",
            "FILES",
            "INSERT_ACTION",
            "INSERT_AUDIT",
            "PG_CLAIM",
            "PG_STORE",
        ):
            sql: str = globals()[name]
            setattr(self, name.lower(), _PARAM.sub(r"%(\1)s", sql) if self.postgresql else sql)

    agent: str
    workload: str
    nonce: str
    rate_hit: str
    use_nonce: str
    move_chain: str
    insert_evidence: str
    insert_result: str
    move_workload: str
    insert_nonce: str
    insert_files: str
    files: str
    insert_action: str
    insert_audit: str
    pg_claim: str
    pg_store: str


def one(cur: Any, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    """Execute and fetch the first row (``None``: no row)."""
    cur.execute(sql, params)
    row: tuple[Any, ...] | None = cur.fetchone()
    return row
