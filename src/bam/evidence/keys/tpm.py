"""A :class:`~bam.evidence.keys.base.Signer` whose private key lives in a TPM (JWS ``ES256``)."""

from __future__ import annotations

import hashlib

from bam.evidence.keys.base import ALG_ES256, jwk_thumbprint
from bam.evidence.tpm import TpmDevice


class TpmSigner:
    """Signs evidence with the TPM's non-exportable P-256 signing key.

    ``device`` must stay open while the signer is used; closing it flushes the key handle.
    """

    def __init__(self, device: TpmDevice) -> None:
        self.device = device
        self._jwk = device.signing_jwk()
        self._thumbprint = jwk_thumbprint(self._jwk)

    @property
    def alg(self) -> str:
        return ALG_ES256

    def sign(self, data: bytes) -> bytes:
        return self.device.sign_digest(hashlib.sha256(data).digest())

    def public_jwk(self) -> dict[str, str]:
        return dict(self._jwk)

    def thumbprint(self) -> str:
        return self._thumbprint

    def __repr__(self) -> str:
        return f"TpmSigner(alg='ES256', kid={self._thumbprint!r}, tcti={self.device.tcti!r})"
