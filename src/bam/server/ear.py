"""EAR: EAT Attestation Results (draft-ietf-rats-ear), signed by the server.

One result per appraisal, as a JWT signed with the server key (EdDSA)::

    {"eat_profile": "tag:github.com,2023:veraison/ear",
     "iat": 1700000000, "eat_nonce": "<the evidence nonce>",
     "ear.verifier-id": {"developer": "bam", "build": "bam 0.1.0"},
     "submods": {"<workload>": {
         "ear.status": "affirming" | "warning" | "contraindicated" | "none",
         "ear.trustworthiness-vector": {"executables": 2, ...},   # AR4SI
         "ear.appraisal-policy-id": "bam-default@v1",
         "bam_policy_version": 1,
         "bam_action": {"action": "allow", "reasons": []},
         "bam_evidence": {"digest": "<sha256 of the token>", "seq": 7},
         "bam_trigger": "evidence" | "stale"}}}

The nonce and evidence digest bind the result to the evidence it appraises; a relying party
verifies the signature with the server's public key (``GET /v1/server-key``) and checks
``iat`` for freshness.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from bam import __version__
from bam.evidence.canonical import b64url_decode, b64url_encode, compact_json
from bam.evidence.errors import VerificationError
from bam.evidence.keys.base import Signer, VerificationKey

EAR_PROFILE = "tag:github.com,2023:veraison/ear"
EAR_TYP = "JWT"

STATUS_TIER = {"none": 0, "affirming": 2, "warning": 32, "contraindicated": 96}


@dataclass(frozen=True)
class Appraisal:
    """What the server decided about one workload at one moment."""

    workload: str
    status: str
    action: str
    reasons: tuple[str, ...]
    trust_vector: dict[str, int]
    policy_id: str
    policy_version: int
    trigger: str
    nonce: str | None = None
    evidence_digest: str | None = None
    seq: int | None = None


def claims_for(appraisal: Appraisal, iat: int) -> dict[str, Any]:
    sub: dict[str, Any] = {
        "ear.status": appraisal.status,
        "ear.trustworthiness-vector": dict(appraisal.trust_vector),
        "ear.appraisal-policy-id": appraisal.policy_id,
        "bam_policy_version": appraisal.policy_version,
        "bam_action": {"action": appraisal.action, "reasons": list(appraisal.reasons)},
        "bam_trigger": appraisal.trigger,
    }
    if appraisal.evidence_digest is not None:
        sub["bam_evidence"] = {"digest": appraisal.evidence_digest, "seq": appraisal.seq}
    claims: dict[str, Any] = {
        "eat_profile": EAR_PROFILE,
        "iat": iat,
        "ear.verifier-id": {"developer": "bam", "build": f"bam {__version__}"},
        "submods": {appraisal.workload: sub},
    }
    if appraisal.nonce is not None:
        claims["eat_nonce"] = appraisal.nonce
    return claims


def sign_ear(appraisal: Appraisal, signer: Signer, iat: float) -> str:
    """The signed EAR (compact JWS) for ``appraisal``.

    One is signed per evidence, so the payload is written by orjson (compact, keys sorted,
    ~10x ``json``); a relying party checks the signature over these exact bytes, so nothing
    depends on how they were produced.
    """
    header = {"alg": signer.alg, "typ": EAR_TYP, "kid": signer.thumbprint()}
    payload = orjson.dumps(claims_for(appraisal, int(iat)), option=orjson.OPT_SORT_KEYS)
    signing_input = b64url_encode(compact_json(header)) + "." + b64url_encode(payload)
    signature = signer.sign(signing_input.encode("ascii"))
    return signing_input + "." + b64url_encode(signature)


def verify_ear(token: str, key: VerificationKey) -> dict[str, Any]:
    """Check an EAR's signature with the server key and return its claims.

    For relying parties and tests; raises :class:`VerificationError` (``bad_signature``,
    ``malformed``, ``unknown_key``, ``profile_mismatch``).
    """
    from bam.evidence.canonical import strict_json_object

    parts = token.strip().split(".")
    if len(parts) != 3:
        raise VerificationError("malformed", "EAR is not a compact JWS")
    header = strict_json_object(b64url_decode(parts[0], "header"), "header")
    if header.get("kid") != key.kid or header.get("alg") != key.alg:
        raise VerificationError("unknown_key", "EAR was not signed by this server key")
    signature = b64url_decode(parts[2], "signature")
    if not key.verify(f"{parts[0]}.{parts[1]}".encode("ascii"), signature):
        raise VerificationError("bad_signature", "EAR signature does not verify")
    claims = strict_json_object(b64url_decode(parts[1], "payload"), "payload")
    if claims.get("eat_profile") != EAR_PROFILE:
        raise VerificationError("profile_mismatch", f"eat_profile is not {EAR_PROFILE!r}")
    return claims


def submod(claims: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The (workload, appraisal) pair of an EAR with one submodule."""
    subs = claims.get("submods")
    if not isinstance(subs, dict) or len(subs) != 1:
        raise VerificationError("claims_invalid", "EAR must appraise exactly one workload")
    name, value = next(iter(subs.items()))
    return name, value


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
