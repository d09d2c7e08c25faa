"""Typed request and response bodies of the HTTP API (pydantic), one per boundary.

Requests forbid unknown members and bound every string, so a malformed body fails validation
with a clear 422 before any handler runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from bam.server.policy import ActionName, Status

WorkloadName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,255}$")]
AgentName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")]
Kind = Literal["process", "vm", "container", "host"]
B64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,512}$")]
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Jwk = dict[
    Annotated[str, StringConstraints(max_length=8)],
    Annotated[str, StringConstraints(max_length=256)],
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorOut(BaseModel):
    """Every error: a stable reason code and a message for people."""

    reason: str
    message: str


class EnrolIn(_In):
    token: Annotated[str, StringConstraints(min_length=8, max_length=128)]
    name: AgentName
    key: Jwk
    """The agent's public signing key (JWK, Ed25519 or P-256)."""
    ak: Jwk | None = None
    """The TPM attestation key (JWK, P-256), when the agent has a TPM."""
    proof: B64
    """Signature by ``key`` over ``bam-enrol/v1\\n<sha256(token)>\\n<kid>``."""


class EnrolOut(BaseModel):
    agent_id: str
    name: str
    kid: str
    server_kid: str
    server_jwk: dict[str, str]


class WorkloadIn(_In):
    name: WorkloadName
    kind: Kind = "process"
    interval_s: Annotated[float, Field(ge=1, le=86400)] = 30.0


class WorkloadOut(BaseModel):
    name: str
    kind: str
    agent_id: str
    agent_name: str
    interval_s: float
    status: str
    action: str
    severity: str | None
    hold: bool
    hold_since: float | None
    stale: bool
    stale_since: float | None
    last_evidence_at: float | None
    last_result_at: float | None
    has_reference: bool
    agent_refused: str | None = None
    """Why the workload's agent is refused until an operator acts (see ``AgentOut``)."""
    agent_refused_at: float | None = None


class WorkloadList(BaseModel):
    workloads: list[WorkloadOut]


class ChallengeOut(BaseModel):
    nonce: str
    expires_at: float
    ttl_s: float
    nonces: list[str] | None = None
    """Every nonce issued (``nonce`` first) when several were asked for (``?count=``)."""


class EvidenceIn(_In):
    token: Annotated[str, StringConstraints(min_length=16, max_length=1 << 20)]


class ResultOut(BaseModel):
    id: int
    workload: str
    status: Status
    action: ActionName
    reasons: list[str]
    trust_vector: dict[str, int]
    policy_id: str
    policy_version: int
    trigger: str
    created_at: float
    evidence_id: int | None
    ear: str
    """The signed EAR (JWT); verify with ``GET /v1/server-key``."""


class ResultList(BaseModel):
    results: list[ResultOut]


class EvidenceOut(BaseModel):
    evidence_id: int
    digest: str
    seq: int
    duplicate: bool
    """True when this exact token had been accepted before (a retry): nothing was stored."""
    result: ResultOut
    next_challenge: ChallengeOut | None
    """A fresh nonce for the next token (saves a round trip); ``None`` on a duplicate."""


class EvidenceBatchIn(_In):
    tokens: Annotated[
        list[Annotated[str, StringConstraints(min_length=16, max_length=1 << 20)]],
        Field(min_length=1, max_length=64),
    ]
    """One agent's tokens in chain order, each over its own nonce."""


class EvidenceBatchItem(BaseModel):
    status: int
    """200 (stored, or a duplicate), else the status the token alone would have got."""
    evidence: EvidenceOut | None = None
    reason: str | None = None
    message: str | None = None


class EvidenceBatchOut(BaseModel):
    items: list[EvidenceBatchItem]
    """One per token, in order; processing stops at the first rejection (424 after it)."""


class EvidenceRow(BaseModel):
    id: int
    chain_epoch: int
    """The agent's chain epoch (an operator's ``reset-chain`` starts the next one at seq 1)."""
    seq: int
    digest: str
    iat: float
    received_at: float
    severity: str | None
    label: str | None
    score: float | None
    window_end: float | None


class EvidenceList(BaseModel):
    evidence: list[EvidenceRow]


class ActionOut(BaseModel):
    id: int
    workload: str
    action: ActionName
    reasons: list[str]
    created_at: float
    state: str
    result_id: int | None
    done_at: float | None = None
    outcome: str | None = None


class ActionList(BaseModel):
    actions: list[ActionOut]


class ActionReportIn(_In):
    state: Literal["done", "failed"]
    outcome: Annotated[str, StringConstraints(max_length=2000)] = ""


class AccessOut(BaseModel):
    workload: str
    allow: bool
    status: str
    action: str
    fresh: bool
    hold: bool
    stale: bool
    reasons: list[str]
    result_id: int | None
    result_at: float | None
    ear: str | None
    server_kid: str


class SecretIn(_In):
    value: Annotated[str, StringConstraints(min_length=1, max_length=65536)]


class SecretOut(BaseModel):
    workload: str
    name: str
    value: str


class PolicyIn(_In):
    source: Annotated[str, StringConstraints(min_length=1, max_length=256 * 1024)]
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = "bam"


class PolicyOut(BaseModel):
    policy_id: str
    name: str
    version: int
    sha256: str
    created_at: float
    created_by: str
    source: str | None = None


class AckIn(_In):
    note: Annotated[str, StringConstraints(max_length=1000)] = ""


class ReferenceIn(_In):
    files: dict[Annotated[str, StringConstraints(min_length=1, max_length=4096)], Hex64] = Field(
        max_length=10000
    )


class EnrolTokenIn(_In):
    note: Annotated[str, StringConstraints(max_length=256)] = ""
    ttl_s: Annotated[float, Field(gt=0, le=30 * 86400)] | None = None


class EnrolTokenOut(BaseModel):
    token: str
    expires_at: float


class OperatorTokenIn(_In):
    name: AgentName
    role: Literal["admin", "viewer", "relying"]


class OperatorTokenOut(BaseModel):
    name: str
    role: str
    token: str


class AuditOut(BaseModel):
    id: int
    at: float
    actor: str
    event: str
    workload: str | None
    detail: dict[str, Any]


class AuditList(BaseModel):
    audit: list[AuditOut]


class AgentOut(BaseModel):
    id: str
    name: str
    kid: str
    tpm: bool
    enrolled_at: float
    revoked: bool
    chain_epoch: int
    """Chain resets so far (``bam server reset-chain``)."""
    last_seq: int
    last_evidence_at: float | None
    refused_reason: str | None = None
    """Set while the agent's chain has diverged (``seq_replay``, ``chain_broken``): its tokens
    are refused until an operator runs ``bam server reset-chain``."""
    refused_at: float | None = None


class AgentList(BaseModel):
    agents: list[AgentOut]


class IntelSourceOut(BaseModel):
    source: str
    hashes: int
    loaded_at: float
    loaded_by: str


class IntelSourceList(BaseModel):
    sources: list[IntelSourceOut]


class IntelLoadOut(BaseModel):
    source: str
    hashes: int
    """SHA-256 file hashes now held for this source."""
    replaced: int
    """Hashes the source held before (replaced by this load)."""
    skipped: dict[str, int]
    """Indicators not usable, by reason (revoked, expired, a pattern file hashes cannot decide)."""


class IntelRemoveOut(BaseModel):
    source: str
    removed: int


class ChainResetOut(BaseModel):
    name: str
    previous_seq: int
    """The chain head the server held before the reset."""
    epoch: int
    """The new chain's epoch (resets so far)."""
    reset_at: float


class ServerKeyOut(BaseModel):
    kid: str
    alg: str
    jwk: dict[str, str]
    pem: str
