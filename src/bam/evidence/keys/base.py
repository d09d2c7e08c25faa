"""The signer interface, public keys as JWK (RFC 7517) and their thumbprints (RFC 7638).

BAM signs evidence with exactly two kinds of key: Ed25519 (``EdDSA``, the software key) and
ECDSA P-256 (``ES256``, a TPM key). Anything else is refused when a key is loaded, so a
verifier can never be handed a key of a type whose algorithm it did not mean to allow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol, runtime_checkable

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from bam.evidence.canonical import b64url_decode, b64url_encode, jcs
from bam.evidence.errors import KeyStoreError, VerificationError

PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey

ALG_EDDSA = "EdDSA"
ALG_ES256 = "ES256"
ALLOWED_ALGS: frozenset[str] = frozenset({ALG_EDDSA, ALG_ES256})
"""The only JWS algorithms BAM signs or accepts. No ``none``, no HMAC, no RSA."""


@runtime_checkable
class Signer(Protocol):
    """What evidence signing needs from a key; the private part never leaves the implementation."""

    @property
    def alg(self) -> str:
        """JWS ``alg``: ``EdDSA`` or ``ES256``."""
        ...

    def sign(self, data: bytes) -> bytes:
        """JWS signature over ``data`` (Ed25519 signature, or ECDSA ``r || s``, 32 bytes each)."""
        ...

    def public_jwk(self) -> dict[str, str]:
        """The public key as a JWK (no private members)."""
        ...

    def thumbprint(self) -> str:
        """RFC 7638 sha256 thumbprint of :meth:`public_jwk` (base64url); the token's ``kid``."""
        ...


_THUMBPRINT_MEMBERS = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y")}


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 thumbprint (sha256, base64url) of an OKP or EC public JWK."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None or any(not isinstance(jwk.get(m), str) for m in members):
        raise KeyStoreError("key_invalid", "JWK is not an OKP or EC public key")
    return b64url_encode(hashlib.sha256(jcs({m: jwk[m] for m in members})).digest())


def public_key_to_jwk(key: PublicKey) -> dict[str, str]:
    """JWK of an Ed25519 or P-256 public key."""
    if isinstance(key, Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        nums = key.public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url_encode(nums.x.to_bytes(32, "big")),
            "y": b64url_encode(nums.y.to_bytes(32, "big")),
        }
    raise KeyStoreError("key_invalid", f"unsupported key type {type(key).__name__}")


def public_key_from_jwk(jwk: Mapping[str, object]) -> PublicKey:
    """Parse an Ed25519 (OKP) or P-256 (EC) public JWK; anything else is refused.

    A JWK carrying a private member (``d``) is refused too: public keys only travel.
    """
    if not isinstance(jwk, Mapping):
        raise KeyStoreError("key_invalid", "JWK is not a JSON object")
    if "d" in jwk:
        raise KeyStoreError("key_invalid", "JWK contains a private key; give the public key")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    try:
        if kty == "OKP" and crv == "Ed25519" and isinstance(jwk.get("x"), str):
            raw = b64url_decode(str(jwk["x"]), "JWK x")
            if len(raw) != 32:
                raise KeyStoreError("key_invalid", "Ed25519 JWK x must be 32 bytes")
            return Ed25519PublicKey.from_public_bytes(raw)
        if kty == "EC" and crv == "P-256" and isinstance(jwk.get("x"), str):
            x = b64url_decode(str(jwk["x"]), "JWK x")
            y = b64url_decode(str(jwk.get("y", "")), "JWK y")
            if len(x) != 32 or len(y) != 32:
                raise KeyStoreError("key_invalid", "P-256 JWK coordinates must be 32 bytes")
            nums = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            )
            return nums.public_key()  # validates that the point is on the curve
    except VerificationError:
        raise KeyStoreError("key_invalid", "JWK coordinates are not base64url") from None
    except ValueError:
        raise KeyStoreError("key_invalid", "JWK is not a valid point on its curve") from None
    raise KeyStoreError("key_invalid", "JWK must be an Ed25519 (OKP) or P-256 (EC) public key")


def alg_for_key(key: PublicKey) -> str:
    """The one JWS algorithm a key may verify: its type decides, never the token header."""
    if isinstance(key, Ed25519PublicKey):
        return ALG_EDDSA
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return ALG_ES256
    raise KeyStoreError("key_invalid", f"unsupported key type {type(key).__name__}")


def ueid_for(thumbprint: str) -> str:
    """The ``ueid`` of an agent: EAT type RAND (0x01) plus 32 bytes derived from its key.

    Derived rather than stored so that the identity cannot drift from the key that signs for it;
    a verifier recomputes it from the key.
    """
    digest = hashlib.sha256(b"bam-ueid:" + thumbprint.encode("ascii")).digest()
    return b64url_encode(b"\x01" + digest)


@dataclass(frozen=True)
class VerificationKey:
    """A trusted public key, with the one algorithm and ``kid`` it implies."""

    key: PublicKey = field(repr=False)
    alg: str
    kid: str
    jwk: dict[str, str] = field(repr=False, compare=False)

    @classmethod
    def from_public_key(cls, key: PublicKey) -> VerificationKey:
        jwk = public_key_to_jwk(key)
        return cls(key=key, alg=alg_for_key(key), kid=jwk_thumbprint(jwk), jwk=jwk)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, object]) -> VerificationKey:
        return cls.from_public_key(public_key_from_jwk(jwk))

    @classmethod
    def from_signer(cls, signer: Signer) -> VerificationKey:
        return cls.from_jwk(signer.public_jwk())

    @classmethod
    def from_text(cls, text: str | bytes, what: str = "public key") -> VerificationKey:
        """Parse a PEM SubjectPublicKeyInfo or a JWK (JSON) public key."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        stripped = data.strip()
        if stripped.startswith(b"{"):
            try:
                obj = json.loads(stripped)
            except ValueError:
                raise KeyStoreError("key_invalid", f"{what} is not valid JSON") from None
            if isinstance(obj, dict) and isinstance(obj.get("jwk"), dict):
                obj = obj["jwk"]  # the output of `bam key show --json`
            if not isinstance(obj, dict):
                raise KeyStoreError("key_invalid", f"{what} is not a JWK object")
            return cls.from_jwk(obj)
        if b"PRIVATE KEY" in stripped:
            raise KeyStoreError("key_invalid", f"{what} is a private key; give the public key")
        try:
            key = serialization.load_pem_public_key(stripped)
        except (ValueError, UnsupportedAlgorithm):
            raise KeyStoreError(
                "key_invalid", f"{what} is neither a PEM public key nor a JWK"
            ) from None
        if not isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise KeyStoreError("key_invalid", f"{what}: only Ed25519 and P-256 keys are accepted")
        return cls.from_public_key(key)

    @classmethod
    def load(cls, path: str | Path) -> VerificationKey:
        """Read a PEM or JWK public key file."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise KeyStoreError("key_unreadable", f"{p}: {e.strerror or e}") from None
        return cls.from_text(data, what=str(p))

    @cached_property
    def ueid(self) -> str:
        """The ``ueid`` an agent signing with this key must claim."""
        return ueid_for(self.kid)

    @cached_property
    def _ed25519_raw(self) -> bytes:
        assert isinstance(self.key, Ed25519PublicKey)
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (JWS form: Ed25519, or P-256 as raw ``r || s``) signs
        ``message`` under this key, with the key's one algorithm.

        Ed25519 goes through libsodium (PyNaCl): on this project's machines it verifies in
        about half the time OpenSSL takes, and it is the check every evidence token and agent
        request pays. libsodium is also the stricter of the two (non-canonical encodings and
        small-order keys are refused), so it accepts nothing OpenSSL would not.
        """
        if self.alg == ALG_EDDSA:
            if len(signature) != 64:
                return False
            try:
                nacl.bindings.crypto_sign_open(signature + message, self._ed25519_raw)
            except (nacl.exceptions.CryptoError, ValueError, TypeError):
                return False
            return True
        if not isinstance(self.key, ec.EllipticCurvePublicKey) or len(signature) != 64:
            return False
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self.key.verify(der, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    def pem(self) -> str:
        """SubjectPublicKeyInfo PEM of the key."""
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
