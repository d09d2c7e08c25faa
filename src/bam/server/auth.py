"""Who is calling: agents by signatures of their pinned keys, operators by bearer tokens.

Agents sign each API request (other than evidence, which is a signed token itself) with the
key pinned at enrolment, in one header::

    BAM-Signature: kid=<thumbprint>; ts=<unix seconds>; sig=<base64url signature>

over ``bam-request/v1\\n<METHOD>\\n<path?query>\\n<ts>\\n<sha256 hex of the body>``. The
timestamp bounds replays to ``request_max_age_s``; every agent request that changes state is
idempotent or nonce-bound, so a replay inside that window gains nothing.

Operator tokens (``bamop_…``) and enrolment tokens (``bamenr_…``) are random 256-bit strings;
the database keeps only their sha256, looked up by digest so that a lookup's timing says
nothing about the secret.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

from bam.evidence.canonical import b64url_decode, b64url_encode
from bam.evidence.errors import VerificationError
from bam.evidence.keys.base import Signer
from bam.server.errors import ServerError

SIGNATURE_HEADER = "bam-signature"
ENROL_PREFIX = "bamenr_"
OPERATOR_PREFIX = "bamop_"
Role = Literal["admin", "viewer", "relying"]
ROLES: tuple[str, ...] = ("admin", "viewer", "relying")


def new_secret_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the database stores for a bearer or enrolment token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def request_message(method: str, path: str, ts: int, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"bam-request/v1\n{method.upper()}\n{path}\n{ts}\n{digest}".encode()


def enrol_message(enrol_token: str, kid: str) -> bytes:
    """What an agent signs at enrolment: proof that it holds the key it registers."""
    return f"bam-enrol/v1\n{token_hash(enrol_token)}\n{kid}".encode()


def sign_request(signer: Signer, method: str, path: str, body: bytes, ts: int) -> str:
    """The ``BAM-Signature`` header value for one request."""
    sig = signer.sign(request_message(method, path, ts, body))
    return f"kid={signer.thumbprint()}; ts={ts}; sig={b64url_encode(sig)}"


@dataclass(frozen=True)
class SignatureHeader:
    kid: str
    ts: int
    sig: bytes


def parse_signature_header(value: str | None) -> SignatureHeader:
    if not value:
        raise ServerError(401, "auth_required", "missing BAM-Signature header")
    fields: dict[str, str] = {}
    for part in value.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            fields[k.strip()] = v.strip()
    try:
        kid, ts, sig = fields["kid"], int(fields["ts"]), b64url_decode(fields["sig"], "sig")
    except (KeyError, ValueError, VerificationError):
        raise ServerError(401, "auth_invalid", "BAM-Signature must be kid=…; ts=…; sig=…") from None
    if not kid or len(kid) > 64 or not kid.isascii():
        raise ServerError(401, "auth_invalid", "BAM-Signature kid is not a key thumbprint")
    return SignatureHeader(kid, ts, sig)


@dataclass(frozen=True)
class Operator:
    """An authenticated operator token."""

    name: str
    role: str

    @property
    def actor(self) -> str:
        return f"operator:{self.name}"

    def require(self, *roles: str) -> None:
        if self.role != "admin" and self.role not in roles:
            raise ServerError(
                403, "forbidden", f"token {self.name!r} ({self.role}) may not do this"
            )
