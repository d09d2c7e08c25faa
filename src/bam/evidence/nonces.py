"""Verifier-side nonces: random, single-use, short-lived.

:class:`NonceBook` is the in-memory reference; the server keeps the same contract in its
database (issue → consume once within ``ttl_s``), so any replica can consume a nonce another
one issued.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable

from bam.evidence.canonical import b64url_encode
from bam.evidence.errors import VerificationError


def new_nonce(n_bytes: int = 32) -> str:
    """A fresh random nonce: ``n_bytes`` (8–64) from the OS CSPRNG, base64url."""
    if not 8 <= n_bytes <= 64:
        raise ValueError("EAT nonces are 8 to 64 bytes")
    return b64url_encode(secrets.token_bytes(n_bytes))


class NonceBook:
    """Issues nonces and accepts each exactly once, within ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._issued: dict[bytes, float] = {}  # sha256(nonce) -> issue time
        self._lock = threading.Lock()

    def issue(self) -> str:
        nonce = new_nonce()
        now = self.clock()
        with self._lock:
            self._expire(now)
            self._issued[_key(nonce)] = now
        return nonce

    def consume(self, nonce: str) -> float:
        """Mark ``nonce`` used and return when it was issued; unknown, used or expired fails."""
        now = self.clock()
        with self._lock:
            issued_at = self._issued.pop(_key(nonce), None)
            self._expire(now)
        if issued_at is None:
            raise VerificationError("nonce_mismatch", "nonce was not issued here or already used")
        if now - issued_at > self.ttl_s:
            raise VerificationError("nonce_stale", "nonce expired")
        return issued_at

    def _expire(self, now: float) -> None:
        for k in [k for k, at in self._issued.items() if now - at > self.ttl_s]:
            del self._issued[k]


def _key(nonce: str) -> bytes:
    # Look up by digest: lookup timing then says nothing about the nonce's own bytes.
    return hashlib.sha256(nonce.encode("utf-8", "surrogatepass")).digest()
