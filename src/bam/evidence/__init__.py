"""Evidence: measurements, keys, TPM quotes, and signed EAT tokens — built and verified.

Agent side: :func:`~bam.evidence.measure.collect_measurements`, a
:class:`~bam.evidence.keys.Signer` (:class:`~bam.evidence.keys.SoftwareKeyStore` or
:class:`~bam.evidence.keys.tpm.TpmSigner`), an optional
:class:`~bam.evidence.tpm.TpmDevice` for quotes, and :class:`EvidenceBuilder`.

Verifier side (pure Python, no TPM needed): :func:`verify_token`.

Names are imported lazily (PEP 562), so ``import bam.evidence.errors`` or the CLI's start-up
does not load pydantic models, cryptography and PyNaCl until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bam.evidence.claims import (
        EAT_PROFILE,
        TOKEN_TYP,
        BehaviorCounts,
        BehaviorSummary,
        EvidenceClaims,
        FileMeasurement,
        Measurements,
        ModelMeasurement,
        Target,
        TpmQuote,
    )
    from bam.evidence.errors import (
        EvidenceError,
        KeyStoreError,
        MeasurementError,
        TpmError,
        VerificationError,
    )
    from bam.evidence.keys import Signer, SoftwareKeyStore, SoftwareSigner, VerificationKey
    from bam.evidence.nonces import NonceBook, new_nonce
    from bam.evidence.token import ChainState, Evidence, EvidenceBuilder, FileChain, MemoryChain
    from bam.evidence.verify import VerifiedEvidence, verify_token

_EXPORTS: dict[str, str] = {
    "BehaviorCounts": "bam.evidence.claims",
    "BehaviorSummary": "bam.evidence.claims",
    "ChainState": "bam.evidence.token",
    "EAT_PROFILE": "bam.evidence.claims",
    "Evidence": "bam.evidence.token",
    "EvidenceBuilder": "bam.evidence.token",
    "EvidenceClaims": "bam.evidence.claims",
    "EvidenceError": "bam.evidence.errors",
    "FileChain": "bam.evidence.token",
    "FileMeasurement": "bam.evidence.claims",
    "KeyStoreError": "bam.evidence.errors",
    "MeasurementError": "bam.evidence.errors",
    "Measurements": "bam.evidence.claims",
    "MemoryChain": "bam.evidence.token",
    "ModelMeasurement": "bam.evidence.claims",
    "NonceBook": "bam.evidence.nonces",
    "Signer": "bam.evidence.keys",
    "SoftwareKeyStore": "bam.evidence.keys",
    "SoftwareSigner": "bam.evidence.keys",
    "TOKEN_TYP": "bam.evidence.claims",
    "Target": "bam.evidence.claims",
    "TpmError": "bam.evidence.errors",
    "TpmQuote": "bam.evidence.claims",
    "VerificationError": "bam.evidence.errors",
    "VerificationKey": "bam.evidence.keys",
    "VerifiedEvidence": "bam.evidence.verify",
    "new_nonce": "bam.evidence.nonces",
    "verify_token": "bam.evidence.verify",
}

__all__ = [
    "EAT_PROFILE",
    "TOKEN_TYP",
    "BehaviorCounts",
    "BehaviorSummary",
    "ChainState",
    "Evidence",
    "EvidenceBuilder",
    "EvidenceClaims",
    "EvidenceError",
    "FileChain",
    "FileMeasurement",
    "KeyStoreError",
    "MeasurementError",
    "Measurements",
    "MemoryChain",
    "ModelMeasurement",
    "NonceBook",
    "Signer",
    "SoftwareKeyStore",
    "SoftwareSigner",
    "Target",
    "TpmError",
    "TpmQuote",
    "VerificationError",
    "VerificationKey",
    "VerifiedEvidence",
    "new_nonce",
    "verify_token",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bam.evidence' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
