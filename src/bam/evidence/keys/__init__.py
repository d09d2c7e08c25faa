"""Signing keys behind one small interface (:class:`Signer`): software Ed25519 or a TPM key."""

from __future__ import annotations

from bam.evidence.keys.base import (
    ALG_EDDSA,
    ALG_ES256,
    ALLOWED_ALGS,
    PublicKey,
    Signer,
    VerificationKey,
    alg_for_key,
    jwk_thumbprint,
    public_key_from_jwk,
    public_key_to_jwk,
    ueid_for,
)
from bam.evidence.keys.software import SoftwareKeyStore, SoftwareSigner, default_data_dir

__all__ = [
    "ALG_EDDSA",
    "ALG_ES256",
    "ALLOWED_ALGS",
    "PublicKey",
    "Signer",
    "SoftwareKeyStore",
    "SoftwareSigner",
    "VerificationKey",
    "alg_for_key",
    "default_data_dir",
    "jwk_thumbprint",
    "public_key_from_jwk",
    "public_key_to_jwk",
    "ueid_for",
]
