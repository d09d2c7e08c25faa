"""Canonical JSON (RFC 8785 JCS), digests and strict base64url.

JCS is what BAM hashes whenever a digest must be reproducible by another party (the TPM
qualifying data, key thumbprints). Token payloads themselves are ordinary compact JSON: the
signature covers their bytes, so they need no canonical form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any, cast

import rfc8785

from bam.evidence.errors import VerificationError

ZERO_DIGEST = "0" * 64
"""``bam_prev`` of the first token in a chain."""


def jcs(value: object) -> bytes:
    """RFC 8785 canonical UTF-8 bytes of a JSON value (raises ``ValueError`` if not I-JSON)."""
    try:
        return rfc8785.dumps(cast(Any, value))
    except (ValueError, RecursionError) as e:  # ints beyond 2^53, NaN, lone surrogates, depth
        raise ValueError(f"not canonicalisable as I-JSON: {_short(e)}") from None


def sha256_hex(data: bytes) -> str:
    """Lower-case hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_TO_STD = bytes.maketrans(b"-_", b"+/")
_B64_VALUES = {
    c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}


def b64url_decode(text: str | bytes, what: str = "base64url value") -> bytes:
    """Strict base64url decode: no padding, no foreign characters, canonical trailing bits.

    Rejecting non-canonical encodings means two different strings never decode to the same
    bytes, so any change to a token's text changes what is verified.
    """
    raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    rem = len(raw) % 4
    if rem == 1 or b"+" in raw or b"/" in raw or b"=" in raw:
        raise VerificationError("malformed", f"{what} is not base64url")
    if rem:
        # The last character of a 2- or 3-character group carries 4 or 2 unused bits: zero.
        last = _B64_VALUES.get(raw[-1], 0)
        if last & (0x0F if rem == 2 else 0x03):
            raise VerificationError("malformed", f"{what} is not canonical base64url")
    try:
        return binascii.a2b_base64(raw.translate(_TO_STD) + b"=" * (-rem % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise VerificationError("malformed", f"{what} is not base64url") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate member {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse ``data`` as one UTF-8 JSON object; duplicate members and NaN/Infinity rejected.

    Duplicate members are rejected because two parsers may keep different ones, letting one
    signed token mean two things.
    """
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise VerificationError("malformed", f"{what} is not valid JSON: {_short(e)}") from None
    if not isinstance(value, dict):
        raise VerificationError("malformed", f"{what} is not a JSON object")
    return value


def compact_json(value: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted UTF-8 JSON (deterministic, not JCS) for token payloads."""
    return json.dumps(
        value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _short(e: BaseException, limit: int = 120) -> str:
    text = str(e)
    return text if len(text) <= limit else text[: limit - 1] + "…"
