"""Helpers shared by the ``test_evidence_*`` modules (no tests here).

- :func:`make_measurements` / :func:`make_behavior`: small, valid submodules;
- :func:`resign`: decode a token, change its header or claims, and sign it again with a key —
  the "compromised agent that holds the key" for tests of what the signature cannot catch;
- :class:`FakeTpm`: a pure-Python quote source (TPMS_ATTEST marshalled with ``struct``, signed
  by a software P-256 key) so quote parsing and verification can be tested and fuzzed without
  a TPM. Real-TPM tests use swtpm (test_evidence_tpm.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from bam.evidence.claims import (
    BamMeasurement,
    BehaviorCounts,
    BehaviorSummary,
    FileMeasurement,
    Measurements,
    Target,
)
from bam.evidence.keys.base import Signer, public_key_to_jwk
from bam.evidence.token import sign_compact
from bam.evidence.tpm import QuoteResult


def b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a token, NOT verified (test inspection only)."""
    h, p, _ = token.split(".")
    return json.loads(b64d(h)), json.loads(b64d(p))


def resign(
    token: str,
    signer: Signer,
    mutate: Callable[[dict[str, Any]], None] | None = None,
    header: dict[str, Any] | None = None,
) -> str:
    """Apply ``mutate`` to the claims (and replace the header if given), then sign again."""
    h, claims = decode(token)
    if mutate is not None:
        mutate(claims)
    return sign_compact(header if header is not None else h, claims, signer)


def make_measurements(name: str = "workload") -> Measurements:
    py = FileMeasurement(role="python", path="/usr/bin/python3", sha256="2" * 64, size=10)
    return Measurements(
        target=Target(kind="process", name=name, pid=1234),
        files=[
            FileMeasurement(role="exe", path="/usr/sbin/nginx", sha256="a" * 64, size=1000),
            FileMeasurement(role="lib", path="/usr/lib/libc.so.6", sha256="b" * 64, size=2000),
        ],
        bam=BamMeasurement(version="0.1.0", code_sha256="c" * 64, code_files=3, python=py),
    )


def make_behavior(severity: str = "none") -> BehaviorSummary:
    return BehaviorSummary.model_validate(
        {
            "window_start": 100.0,
            "window_end": 110.5,
            "baseline_id": "d" * 64,
            "scores": {"ngram": 0.25, "hmm": 1.5},
            "thresholds": {"ngram": 0.5, "hmm": 4.0},
            "severity": severity,
            "label": "normal",
            "probability": 0.93,
            "top_features": ["openat->read"],
            "counts": BehaviorCounts(new_processes=0, new_listening_ports=1, exec_mappings=2),
            "raw_log_sha256": "e" * 64,
        }
    )


def marshal_attest(
    extra: bytes,
    pcr_digest: bytes,
    pcrs: Sequence[int],
    *,
    clock: int = 1000,
    reset: int = 1,
    restart: int = 0,
    safe: bool = True,
    magic: int = 0xFF544347,
    st: int = 0x8018,
    bank: int = 0x000B,
) -> bytes:
    """A TPMS_ATTEST for a quote, marshalled as a TPM does (big-endian)."""
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    signer_name = b"\x00\x0b" + hashlib.sha256(b"fake ak").digest()
    return (
        struct.pack(">IH", magic, st)
        + struct.pack(">H", len(signer_name))
        + signer_name
        + struct.pack(">H", len(extra))
        + extra
        + struct.pack(">QIIB", clock, reset, restart, int(safe))
        + struct.pack(">Q", 0x0001000200030004)
        + struct.pack(">IHB", 1, bank, 3)
        + bytes(bitmap)
        + struct.pack(">H", len(pcr_digest))
        + pcr_digest
    )


def marshal_ecdsa_signature(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    rb, sb = r.to_bytes(32, "big"), s.to_bytes(32, "big")
    return struct.pack(">HHH", 0x0018, 0x000B, 32) + rb + struct.pack(">H", 32) + sb


class FakeTpm:
    """A software stand-in for a TPM's quote (for parser tests and fuzzing only)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.pcr_values: dict[int, bytes] = {i: bytes(32) for i in range(24)}
        self.clock = 1000
        self.reset = 1
        self.restart = 0
        self.safe = True

    def ak_jwk(self) -> dict[str, str]:
        return public_key_to_jwk(self.key.public_key())

    def quote(
        self, qualifying_data: bytes, pcrs: Sequence[int] = (0, 1, 2), bank: str = "sha256"
    ) -> QuoteResult:
        self.clock += 10
        values = {i: self.pcr_values[i] for i in sorted(pcrs)}
        digest = hashlib.sha256(b"".join(values.values())).digest()
        attest = marshal_attest(
            qualifying_data,
            digest,
            sorted(pcrs),
            clock=self.clock,
            reset=self.reset,
            restart=self.restart,
            safe=self.safe,
        )
        der = self.key.sign(attest, ec.ECDSA(hashes.SHA256()))
        return QuoteResult(attest, marshal_ecdsa_signature(der), bank, values)
