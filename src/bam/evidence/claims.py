"""The claims of a BAM evidence token (an EAT, RFC 9711, carried as a JWT).

One pinned profile (:data:`EAT_PROFILE`) fixes the shape: unknown members are rejected, numbers
stay inside the I-JSON range (so every claim can be canonicalised with RFC 8785), and digests
are lower-case hex sha256 (comparable with ``sha256sum`` output). Binary TPM structures are
base64url, as JOSE does for binary data.

Submodules:

- ``measurements`` — what the workload runs from (executable, libraries, VM images, kernel,
  firmware), BAM's own code and the model files the detector uses;
- ``behavior`` — the behavioural summary of one window (scores against the baseline);
- ``tpm`` — a TPM quote binding all of the above to a fresh TPM signature (when a TPM is present).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from bam.evidence.canonical import compact_json, sha256_hex

EAT_PROFILE = "tag:bam.dev,2025:eat/v1"
"""The pinned ``eat_profile``: a verifier rejects any other."""

TOKEN_TYP = "eat+jwt"  # noqa: S105 (a media type, not a password)
"""JOSE ``typ`` header of evidence tokens (RFC 9711 §7.1)."""

MAX_SAFE_INT = 2**53 - 1

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
HexDigest = Annotated[
    str, StringConstraints(pattern=r"^(?:[0-9a-f]{40}|[0-9a-f]{64}|[0-9a-f]{96}|[0-9a-f]{128})$")
]
SafeInt = Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
B64Url = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]*$", max_length=16384)]
Nonce = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,88}$")]
"""A verifier-issued nonce: 8–88 base64url characters (EAT allows 8–64 bytes)."""
Ueid = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{44}$")]
PcrIndex = Annotated[str, StringConstraints(pattern=r"^(?:[0-9]|1[0-9]|2[0-3])$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Path_ = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Score = Annotated[float, Field(allow_inf_nan=False)]

Severity = Literal["none", "info", "low", "medium", "high", "critical"]
FileRole = Literal[
    "exe", "lib", "disk", "kernel", "initrd", "firmware", "bam", "python", "model", "config", "file"
]
PcrBank = Literal["sha1", "sha256", "sha384", "sha512"]

PCR_BANK_SIZES: dict[str, int] = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


class _Claims(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class FileMeasurement(_Claims):
    """sha256 of one file as it was read (for a mapped file: the mapping's own inode)."""

    role: FileRole
    path: Path_
    sha256: Hex64
    size: SafeInt
    deleted: bool = False
    """The file was mapped or running but no longer exists under ``path`` (suspicious)."""


class Target(_Claims):
    """The workload this evidence is about."""

    kind: Literal["process", "vm", "container", "host"]
    name: Name
    pid: SafeInt | None = None


class BamMeasurement(_Claims):
    """BAM's own code, so the verifier can appraise the detector itself."""

    version: Annotated[str, StringConstraints(max_length=64)]
    code_sha256: Hex64
    """sha256 of the JCS map ``{relative path: sha256}`` over the ``bam`` package files."""
    code_files: SafeInt
    python: FileMeasurement


class ModelMeasurement(_Claims):
    """A baseline or classifier the detector used, by ``model_id`` and its files' digests."""

    model_id: Name
    role: Name
    files: list[FileMeasurement]


class Measurements(_Claims):
    """The ``measurements`` submodule."""

    target: Target
    files: list[FileMeasurement]
    files_sha256: Hex64 | None = None
    """:func:`files_sha256` of ``files``. With ``files`` left empty it stands *for* them: the
    list was sent in full by an earlier token and the verifier keeps it by this digest (as
    Keylime's verifier asks only for IMA log entries it has not seen). A workload's files
    rarely change between windows, and sending and checking the same ~24 hashes in every
    token was the larger part of its size and of its verification cost. The signature
    covers the digest, and the digest commits to the list, so a token by reference binds
    exactly what the full token did."""
    anon_exec_mappings: SafeInt = 0
    """Executable mappings backed by no file (JIT, injected or ``memfd`` code)."""
    bam: BamMeasurement
    models: list[ModelMeasurement] = Field(default_factory=list)

    @model_validator(mode="after")
    def _files_digest(self) -> Measurements:
        digest = self.files_sha256
        if self.files and digest is not None and files_sha256(self.files) != digest:
            raise ValueError("files_sha256 is not the digest of files")
        return self

    @property
    def by_reference(self) -> bool:
        """Whether ``files`` is given by its digest only (see ``files_sha256``)."""
        return not self.files and self.files_sha256 is not None


def files_sha256(files: Sequence[FileMeasurement | Mapping[str, Any]]) -> str:
    """The digest a token gives its ``files`` by: sha256 of ``{"files": [...]}`` as compact,
    key-sorted JSON (each file as its claim, unset members left out)."""
    items = [
        f.model_dump(mode="json", exclude_none=True) if isinstance(f, BaseModel) else f
        for f in files
    ]
    return sha256_hex(compact_json({"files": items}))


class BehaviorCounts(_Claims):
    new_processes: SafeInt
    new_listening_ports: SafeInt
    exec_mappings: SafeInt


class BehaviorSummary(_Claims):
    """The ``behavior`` submodule: one detection window scored against the baseline."""

    window_start: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    window_end: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    baseline_id: Name
    scores: dict[Name, Score]
    thresholds: dict[Name, Score]
    severity: Severity
    label: Name | None = None
    """Classifier label (``None``: no classifier ran)."""
    probability: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    top_features: list[Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=list
    )
    counts: BehaviorCounts
    raw_log_sha256: Hex64
    """sha256 of the raw window log kept locally, so a later investigation can prove it."""

    @model_validator(mode="after")
    def _window_order(self) -> BehaviorSummary:
        if self.window_end < self.window_start:
            raise ValueError("window_end is before window_start")
        return self


class TpmQuote(_Claims):
    """The ``tpm`` submodule: a quote by the attestation key (AK) and the quoted PCR values.

    ``attest`` is the TPMS_ATTEST the TPM signed and ``signature`` its TPMT_SIGNATURE, both
    exactly as the TPM returned them. ``clock``, ``reset_count``, ``restart_count``, ``safe``
    and ``firmware_version`` repeat the signed values for readability; a verifier checks they
    equal the ones inside ``attest``.
    """

    ak: dict[Annotated[str, StringConstraints(max_length=8)], B64Url]
    """Public JWK of the attestation key."""
    pcr_bank: PcrBank
    pcrs: dict[PcrIndex, HexDigest]
    attest: B64Url
    signature: B64Url
    clock: SafeInt
    reset_count: U32
    restart_count: U32
    safe: bool
    firmware_version: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]

    @model_validator(mode="after")
    def _digest_sizes(self) -> TpmQuote:
        size = PCR_BANK_SIZES[self.pcr_bank] * 2
        if any(len(v) != size for v in self.pcrs.values()):
            raise ValueError(f"PCR values must be {self.pcr_bank} digests")
        return self


class Submods(_Claims):
    measurements: Measurements
    behavior: BehaviorSummary | None = None
    tpm: TpmQuote | None = None


class EvidenceClaims(_Claims):
    """The full claim set of a BAM evidence token."""

    eat_profile: Literal["tag:bam.dev,2025:eat/v1"]
    iat: SafeInt
    eat_nonce: Nonce
    ueid: Ueid
    bam_seq: Annotated[int, Field(ge=1, le=MAX_SAFE_INT)]
    bam_prev: Hex64
    submods: Submods
