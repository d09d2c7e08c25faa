"""Errors of the evidence layer.

Every failure carries a machine-readable ``reason`` code (stable, for the server, the API and
tests) and a human message. Messages name *what* failed and never contain key material.
"""

from __future__ import annotations

from bam.errors import BamError


class EvidenceError(BamError):
    """Base class: something about evidence (keys, measurements, TPM, tokens) went wrong."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


class VerificationError(EvidenceError):
    """A token or TPM quote failed verification; ``reason`` says which check failed.

    Reason codes (see :mod:`bam.evidence.verify`): ``malformed``, ``header_invalid``,
    ``alg_not_allowed``, ``alg_key_mismatch``, ``typ_invalid``, ``unknown_key``,
    ``bad_signature``, ``claims_invalid``, ``profile_mismatch``, ``ueid_mismatch``,
    ``nonce_mismatch``, ``nonce_reused``, ``nonce_stale``, ``iat_in_future``, ``seq_gap``,
    ``seq_replay``, ``chain_broken``, ``tpm_missing``, ``tpm_ak_invalid``, ``tpm_ak_untrusted``,
    ``tpm_attest_malformed``, ``tpm_signature_malformed``, ``tpm_quote_signature``,
    ``tpm_qualifying_data``, ``tpm_pcr_selection``, ``tpm_pcr_digest``, ``tpm_pcr_value``,
    ``tpm_clock_mismatch``, ``tpm_reset_back``, ``tpm_restart_back``, ``tpm_clock_back``;
    ``previous_invalid`` from ``bam report verify --prev``.
    """


class KeyStoreError(EvidenceError):
    """A key could not be created, loaded or parsed (never includes the key itself)."""


class MeasurementError(EvidenceError):
    """A file or process could not be measured."""


class TpmError(EvidenceError):
    """The TPM is unavailable or refused an operation."""
