"""The server's tables (SQLAlchemy 2 declarative models).

Times are UNIX seconds as floats: comparable across SQLite and PostgreSQL without time-zone
conversion, and what the evidence layer uses. Everything a replica needs to decide anything
lives here — nonces, chain state, rate-limit counters, policies — never in process memory.

Secrets (enrolment and operator tokens) are stored only as sha256 digests; the random token
itself is shown once, when it is created.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Auto-increment ids: BIGINT on PostgreSQL, INTEGER (rowid alias) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


def table(model: type[Base]) -> Table:
    """A model's Core table, typed as one (Core statements are what the hot path uses)."""
    return cast(Table, model.__table__)


class Agent(Base):
    """An enrolled agent and its pinned keys, plus the state of its evidence chain."""

    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kid: Mapped[str] = mapped_column(String(64), unique=True)
    """RFC 7638 thumbprint of the pinned signing key (the ``kid`` of its tokens)."""
    jwk: Mapped[str] = mapped_column(Text)
    ak_kid: Mapped[str | None] = mapped_column(String(64))
    ak_jwk: Mapped[str | None] = mapped_column(Text)
    enrolled_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)
    # Chain state: the last accepted token (updated with a compare-and-set on last_seq).
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    last_digest: Mapped[str] = mapped_column(String(64), default="0" * 64)
    last_nonce: Mapped[str | None] = mapped_column(String(88))
    last_evidence_at: Mapped[float | None] = mapped_column(Float)
    tpm_clock: Mapped[int | None] = mapped_column(BigInteger)
    tpm_reset: Mapped[int | None] = mapped_column(BigInteger)
    tpm_restart: Mapped[int | None] = mapped_column(BigInteger)
    tpm_safe: Mapped[bool | None] = mapped_column(Boolean)
    tpm_ak: Mapped[str | None] = mapped_column(String(64))
    chain_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """How many times an operator reset the chain (each reset starts a new one at seq 1)."""
    refused_reason: Mapped[str | None] = mapped_column(String(64))
    """Why the agent's last token was refused, when only an operator can end it (its chain
    diverged: ``seq_replay``, ``chain_broken``); cleared by its next accepted token."""
    refused_at: Mapped[float | None] = mapped_column(Float)


class EnrolToken(Base):
    __tablename__ = "enrol_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    note: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float)
    used_by: Mapped[str | None] = mapped_column(String(40))


class OperatorToken(Base):
    __tablename__ = "operator_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    """``admin`` (everything), ``viewer`` (read API, dashboard, metrics), ``relying`` (gate)."""
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class Workload(Base):
    """A VM, container or process tree watched by one agent; its current trust state."""

    __tablename__ = "workloads"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    interval_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    reference: Mapped[str | None] = mapped_column(Text)
    """Reference values (JSON ``{"files": {path: sha256}}``) set by an operator."""
    status: Mapped[str] = mapped_column(String(16), default="none")
    action: Mapped[str] = mapped_column(String(16), default="allow")
    severity: Mapped[str | None] = mapped_column(String(16))
    hold: Mapped[bool] = mapped_column(Boolean, default=False)
    """A contraindicated result stands until an operator acknowledges it."""
    hold_since: Mapped[float | None] = mapped_column(Float)
    hold_action: Mapped[str | None] = mapped_column(String(16))
    stale: Mapped[bool] = mapped_column(Boolean, default=False)
    stale_since: Mapped[float | None] = mapped_column(Float)
    last_evidence_at: Mapped[float | None] = mapped_column(Float)
    last_result_id: Mapped[int | None] = mapped_column(BigInteger)
    last_result_at: Mapped[float | None] = mapped_column(Float)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    """Bumped by every change: writers compare-and-set on it (optimistic concurrency)."""


class Nonce(Base):
    """A challenge: single use, bound to the agent it was issued to, short-lived."""

    __tablename__ = "nonces"

    nonce_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(40))
    issued_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
    used_at: Mapped[float | None] = mapped_column(Float)


class Evidence(Base):
    """A verified evidence token, stored verbatim (its signature can be re-checked later)."""

    __tablename__ = "evidence"
    __table_args__ = (
        UniqueConstraint("agent_id", "chain_epoch", "seq", name="uq_evidence_agent_epoch_seq"),
        Index("ix_evidence_workload_id", "workload_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    agent_id: Mapped[str] = mapped_column(String(40))
    workload_id: Mapped[int] = mapped_column(BigInteger)
    chain_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    seq: Mapped[int] = mapped_column(BigInteger)
    iat: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    severity: Mapped[str | None] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(256))
    score: Mapped[float | None] = mapped_column(Float)
    """Largest score/threshold ratio over the models (1.0 = at threshold): the timeline."""
    window_end: Mapped[float | None] = mapped_column(Float)
    token: Mapped[str] = mapped_column(Text)


class Result(Base):
    """An appraisal (EAR): of one evidence, or of a missing one (stale workload)."""

    __tablename__ = "results"
    __table_args__ = (Index("ix_results_workload_id", "workload_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    evidence_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    workload_id: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    trigger: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[str] = mapped_column(Text)
    policy_id: Mapped[str] = mapped_column(String(128))
    policy_version: Mapped[int] = mapped_column(Integer)
    ear: Mapped[str] = mapped_column(Text)


class Action(Base):
    """An action the policy asked for (a change of the workload's action), for its agent."""

    __tablename__ = "actions"
    __table_args__ = (Index("ix_actions_agent_id", "agent_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    workload_id: Mapped[int] = mapped_column(BigInteger)
    agent_id: Mapped[str] = mapped_column(String(40))
    result_id: Mapped[int | None] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    """``pending`` → ``done`` / ``failed`` (reported by the agent)."""
    done_at: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str | None] = mapped_column(Text)


class Audit(Base):
    """Who did what, when: enrolment, tokens, policies, actions, acks, stale, secret release."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_workload", "workload", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(160))
    event: Mapped[str] = mapped_column(String(32))
    workload: Mapped[str | None] = mapped_column(String(256))
    detail: Mapped[str] = mapped_column(Text)


class Policy(Base):
    """A validated Rego policy version; the highest version is the one in force."""

    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_policies_name_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(160))


class Secret(Base):
    """A secret (e.g. a disk key) released only to a trusted workload; AES-GCM encrypted."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("workload_id", "name", name="uq_secrets_workload_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    workload_id: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(128))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class RateCounter(Base):
    """Requests per subject per fixed window: a rate limit shared by all replicas."""

    __tablename__ = "rate_counters"

    subject: Mapped[str] = mapped_column(String(80), primary_key=True)
    window: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    count: Mapped[int] = mapped_column(Integer)


class IntelIndicator(Base):
    """A SHA-256 file hash that a loaded STIX 2.1 indicator names as malicious."""

    __tablename__ = "intel_indicators"
    __table_args__ = (
        UniqueConstraint("source", "stix_id", "sha256", name="uq_intel_source_indicator_hash"),
        Index("ix_intel_indicators_sha256", "sha256"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(128))
    """The feed it came from: loading a bundle under a source replaces that source's rows."""
    stix_id: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(256))
    valid_until: Mapped[float | None] = mapped_column(Float)
    loaded_at: Mapped[float] = mapped_column(Float)
    loaded_by: Mapped[str] = mapped_column(String(128))


class MeasurementSet(Base):
    """A measured file list, stored once by its digest (the ``files_sha256`` tokens carry).

    Content-addressed and never changed: a token may give its files as this digest only once
    a token carrying the list in full was verified and stored (see
    :class:`bam.evidence.claims.Measurements`). Rows are not tied to an agent or workload: the
    digest commits to the list, whoever sent it first.
    """

    __tablename__ = "measurement_sets"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    files: Mapped[str] = mapped_column(Text)
    """The list as JSON (each file as its claim)."""
    created_at: Mapped[float] = mapped_column(Float)
