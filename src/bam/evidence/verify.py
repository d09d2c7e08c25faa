"""Verify an evidence token completely, failing with one specific reason per problem.

Order (nothing is parsed deeper than the JOSE header before the signature verifies):

1. structure: three strictly base64url parts, size-bounded;
2. header: ``alg`` on the allow-list (``EdDSA``, ``ES256``: no ``none``, no HMAC), ``typ`` is
   ``eat+jwt``, ``kid`` present, no other members (no ``crit``, ``jku``, ``jwk``, ``b64`` …);
3. key: chosen by ``kid`` among the *trusted* keys given by the caller; the key's type fixes
   the one algorithm it may verify, so a header cannot make an EC or Ed25519 key be used as an
   HMAC secret (alg confusion) — ``unknown_key`` / ``alg_key_mismatch``;
4. signature (:meth:`VerificationKey.verify`: libsodium for Ed25519) — ``bad_signature``;
5. claims: strict JSON (no duplicate members), pinned ``eat_profile``, schema, ``ueid`` derived
   from the signing key;
6. nonce and freshness (when the caller expects a nonce): equal in constant time, ``iat`` within
   ``max_age_s``; never the previous token's nonce — ``nonce_*``, ``iat_in_future``;
7. chain (with the previous verified token): ``bam_seq`` exactly +1 (``seq_gap`` /
   ``seq_replay``), ``bam_prev`` = sha256 of the previous token (``chain_broken``);
8. TPM quote (when present, or required, or present in the previous token): AK trusted, quote
   signature, qualifying data = sha256(nonce || sha256(JCS(claims without submods.tpm))), PCR
   selection and digest, copied clock values, expected PCR values, and clock / resetCount /
   restartCount monotonic against the previous token.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from bam.evidence.canonical import ZERO_DIGEST, b64url_decode, sha256_hex, strict_json_object
from bam.evidence.claims import EAT_PROFILE, TOKEN_TYP, EvidenceClaims, TpmQuote
from bam.evidence.errors import KeyStoreError, VerificationError
from bam.evidence.keys.base import (
    ALLOWED_ALGS,
    VerificationKey,
    jwk_thumbprint,
    public_key_from_jwk,
)
from bam.evidence.quote import ClockInfo, qualifying_data, verify_quote

DEFAULT_MAX_AGE_S = 300.0
DEFAULT_CLOCK_SKEW_S = 30.0
MAX_TOKEN_CHARS = 1 << 20
_HEADER_MEMBERS = frozenset({"alg", "typ", "kid"})


@dataclass(frozen=True)
class VerifiedEvidence:
    """A token that passed every check that was asked for (``checks`` says which)."""

    token: str
    digest: str
    header: dict[str, Any]
    payload_bytes: bytes = field(repr=False)
    claims: EvidenceClaims
    kid: str
    tpm_clock: ClockInfo | None = None
    ak_thumbprint: str | None = None
    checks: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @cached_property
    def payload(self) -> dict[str, Any]:
        """The claims exactly as signed, as a JSON object."""
        return _payload_dict(self.payload_bytes)

    def summary(self) -> dict[str, Any]:
        """JSON-ready result: ``ok``, claims, header, checks and notes."""
        return {
            "ok": True,
            "digest": self.digest,
            "kid": self.kid,
            "header": self.header,
            "claims": self.payload,
            "checks": self.checks,
            "notes": list(self.notes),
        }


def _fail(reason: str, message: str) -> VerificationError:
    return VerificationError(reason, message)


def _as_text(token: object) -> str:
    if isinstance(token, bytes | bytearray):
        try:
            token = bytes(token).decode("ascii")
        except UnicodeDecodeError:
            raise _fail("malformed", "token is not ASCII") from None
    if not isinstance(token, str):
        raise _fail("malformed", "token is not text")
    text = token.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise _fail("malformed", f"token longer than {MAX_TOKEN_CHARS} characters")
    if not text.isascii():
        raise _fail("malformed", "token is not ASCII")
    return text


def _check_header(header: dict[str, Any]) -> str:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        shown = alg if isinstance(alg, str) and len(alg) <= 32 else type(alg).__name__
        raise _fail(
            "alg_not_allowed",
            f"alg {shown!r} is not allowed (only {', '.join(sorted(ALLOWED_ALGS))})",
        )
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() != TOKEN_TYP:
        raise _fail("typ_invalid", f"typ must be {TOKEN_TYP!r}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 128 or not kid.isascii():
        raise _fail("header_invalid", "kid is missing or not a key thumbprint")
    extra = sorted(set(header) - _HEADER_MEMBERS)
    if extra:
        shown = ", ".join(repr(k[:32]) for k in extra[:5])
        raise _fail("header_invalid", f"unsupported header members: {shown}")
    return alg


def _select_key(keys: Iterable[VerificationKey], kid: str, alg: str) -> VerificationKey:
    candidates = list(keys)
    if not candidates:
        raise _fail("unknown_key", "no trusted key was given")
    matching = [k for k in candidates if hmac.compare_digest(k.kid, kid)]
    if not matching:
        known = ", ".join(k.kid for k in candidates[:3])
        raise _fail(
            "unknown_key",
            f"token was signed by key {kid[:64]!r}, which is not trusted (trusted: {known})",
        )
    vk = matching[0]
    if alg != vk.alg:
        raise _fail(
            "alg_key_mismatch",
            f"header alg {alg!r} does not match the key, which only verifies {vk.alg!r}",
        )
    return vk


def _verify_signature(signing_input: str, signature: bytes, vk: VerificationKey) -> None:
    # The key verifies with its one algorithm (see VerificationKey.verify). A JOSE library's
    # decode is not used: this module already parsed the token strictly, and PyJWT's re-validates
    # base64 with a per-character Python loop that costs ~1.5 ms on a 13 kB token.
    if not vk.verify(signing_input.encode("ascii"), signature):
        raise _fail("bad_signature", f"signature does not verify with key {vk.kid}")


def _validate_claims(payload: bytes) -> EvidenceClaims:
    # pydantic parses and validates in one pass (duplicate members: the last one wins, as
    # RFC 7519 §4 permits; json.loads, used for the TPM binding, resolves them the same way).
    try:
        return EvidenceClaims.model_validate_json(payload)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        first = errors[0] if errors else {"loc": (), "msg": "invalid", "type": ""}
        if first["type"] == "json_invalid" or (first["type"] == "model_type" and not first["loc"]):
            raise _fail("malformed", "claims are not a JSON object") from None
        if any(err["loc"] == ("eat_profile",) for err in errors):
            raise _fail("profile_mismatch", f"eat_profile is not {EAT_PROFILE!r}") from None
        where = ".".join(str(p) for p in first["loc"]) or "claims"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise _fail("claims_invalid", f"{where}: {first['msg']}{more}") from None


def _payload_dict(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        raise _fail("malformed", "claims are not valid JSON") from None
    if not isinstance(value, dict):
        raise _fail("malformed", "claims are not a JSON object")
    return value


def verify_token(
    token: str | bytes,
    keys: VerificationKey | Iterable[VerificationKey],
    *,
    nonce: str | None = None,
    nonce_issued_at: float | None = None,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
    previous: VerifiedEvidence | None = None,
    require_tpm: bool = False,
    trusted_aks: Iterable[str] | None = None,
    expected_pcrs: Mapping[int, str] | None = None,
    now: float | None = None,
) -> VerifiedEvidence:
    """Verify ``token`` against trusted ``keys``; raise :class:`VerificationError` on failure.

    ``nonce``: the value this verifier issued (checked with freshness: ``iat`` no older than
    ``max_age_s``, and not before ``nonce_issued_at``). ``previous``: the last verified token of
    this agent (chain, nonce reuse, TPM monotonicity). ``trusted_aks``: RFC 7638 thumbprints of
    enrolled attestation keys. ``expected_pcrs``: reference PCR values (hex) to enforce.
    """
    text = _as_text(token)
    parts = text.split(".")
    if len(parts) != 3:
        raise _fail("malformed", "token is not a compact JWS (three dot-separated parts)")
    header = strict_json_object(b64url_decode(parts[0], "header"), "header")
    alg = _check_header(header)
    payload_bytes = b64url_decode(parts[1], "payload")
    signature = b64url_decode(parts[2], "signature")
    key_list = [keys] if isinstance(keys, VerificationKey) else list(keys)
    vk = _select_key(key_list, header["kid"], alg)
    checks: dict[str, str] = {"alg": "ok", "signature": "ok"}
    notes: list[str] = []

    _verify_signature(f"{parts[0]}.{parts[1]}", signature, vk)
    claims = _validate_claims(payload_bytes)
    checks["profile"] = "ok"
    ms = claims.submods.measurements
    if ms.by_reference:
        # Resolving the digest to a list is the verifier's business (it holds the lists by
        # digest); this token binds the files exactly as if it carried them.
        checks["files"] = f"by reference: sha256 {ms.files_sha256}"
    elif ms.files_sha256 is not None:
        checks["files"] = "ok (digest matches)"
    if not hmac.compare_digest(claims.ueid, vk.ueid):
        raise _fail("ueid_mismatch", "ueid does not belong to the signing key")
    checks["ueid"] = "ok"

    t_now = time.time() if now is None else now
    if claims.iat > t_now + clock_skew_s:
        raise _fail("iat_in_future", f"iat is {claims.iat - t_now:.0f} s in the future")
    if previous is not None and hmac.compare_digest(
        claims.eat_nonce.encode(), previous.claims.eat_nonce.encode()
    ):
        raise _fail("nonce_reused", "the nonce was already used by the previous token")
    if nonce is not None:
        if not hmac.compare_digest(claims.eat_nonce.encode(), nonce.encode("utf-8", "replace")):
            raise _fail("nonce_mismatch", "eat_nonce is not the nonce this verifier issued")
        age = t_now - claims.iat
        if age > max_age_s:
            raise _fail("nonce_stale", f"token is {age:.0f} s old (max {max_age_s:.0f} s)")
        if nonce_issued_at is not None:
            if t_now - nonce_issued_at > max_age_s:
                raise _fail("nonce_stale", "the nonce expired before the token arrived")
            if claims.iat < nonce_issued_at - clock_skew_s:
                raise _fail("nonce_stale", "token was issued before its nonce")
        checks["nonce"] = "ok"
    else:
        checks["nonce"] = "skipped: no expected nonce given"

    _check_chain(claims, previous, checks)
    tpm_clock, ak_thumb = _check_tpm(
        claims, payload_bytes, previous, require_tpm, trusted_aks, expected_pcrs, checks, notes
    )
    return VerifiedEvidence(
        token=text,
        digest=sha256_hex(text.encode("ascii")),
        header=header,
        payload_bytes=payload_bytes,
        claims=claims,
        kid=vk.kid,
        tpm_clock=tpm_clock,
        ak_thumbprint=ak_thumb,
        checks=checks,
        notes=tuple(notes),
    )


def _check_chain(
    claims: EvidenceClaims, previous: VerifiedEvidence | None, checks: dict[str, str]
) -> None:
    if previous is None:
        if claims.bam_seq == 1:
            if not hmac.compare_digest(claims.bam_prev, ZERO_DIGEST):
                raise _fail("chain_broken", "the first token (bam_seq 1) must have a zero bam_prev")
            checks["chain"] = "ok (first token)"
        else:
            checks["chain"] = "skipped: no previous token given"
        return
    if not hmac.compare_digest(claims.ueid, previous.claims.ueid):
        raise _fail("chain_broken", "the previous token is from another agent (ueid differs)")
    expected = previous.claims.bam_seq + 1
    if claims.bam_seq > expected:
        raise _fail(
            "seq_gap",
            f"bam_seq {claims.bam_seq} skips {claims.bam_seq - expected} token(s) after "
            f"{previous.claims.bam_seq}",
        )
    if claims.bam_seq < expected:
        raise _fail(
            "seq_replay",
            f"bam_seq {claims.bam_seq} does not advance past {previous.claims.bam_seq}",
        )
    if not hmac.compare_digest(claims.bam_prev, previous.digest):
        raise _fail("chain_broken", "bam_prev is not the sha256 of the previous token")
    checks["chain"] = "ok"


def _check_tpm(
    claims: EvidenceClaims,
    payload_bytes: bytes,
    previous: VerifiedEvidence | None,
    require_tpm: bool,
    trusted_aks: Iterable[str] | None,
    expected_pcrs: Mapping[int, str] | None,
    checks: dict[str, str],
    notes: list[str],
) -> tuple[ClockInfo | None, str | None]:
    tpm = claims.submods.tpm
    if tpm is None:
        if require_tpm:
            raise _fail("tpm_missing", "a TPM quote is required but the token has none")
        if previous is not None and previous.tpm_clock is not None:
            raise _fail("tpm_missing", "the previous token had a TPM quote, this one has none")
        checks["tpm"] = "skipped: no TPM quote in token"
        return None, None

    try:
        ak = public_key_from_jwk(tpm.ak)
        ak_thumb = jwk_thumbprint(tpm.ak)
    except KeyStoreError as e:
        raise _fail("tpm_ak_invalid", f"attestation key: {e.message}") from None
    if not isinstance(ak, ec.EllipticCurvePublicKey):
        raise _fail("tpm_ak_invalid", "the attestation key is not an EC key")
    trusted = None if trusted_aks is None else set(trusted_aks)
    if trusted is not None:
        if ak_thumb not in trusted:
            raise _fail("tpm_ak_untrusted", f"attestation key {ak_thumb} is not enrolled")
        checks["tpm_ak"] = "ok (enrolled)"
    elif previous is not None and previous.ak_thumbprint is not None:
        if not hmac.compare_digest(ak_thumb, previous.ak_thumbprint):
            raise _fail("tpm_ak_untrusted", "the attestation key changed since the previous token")
        checks["tpm_ak"] = "ok (same as previous token)"
    else:
        checks["tpm_ak"] = "skipped: attestation key not pinned"
        notes.append("tpm_ak_not_pinned")

    attest = _b64(tpm.attest, "tpm_attest_malformed", "attest")
    signature = _b64(tpm.signature, "tpm_signature_malformed", "signature")
    payload = _payload_dict(payload_bytes)
    without_tpm = dict(payload)
    without_tpm["submods"] = {k: v for k, v in payload["submods"].items() if k != "tpm"}
    try:
        expected_qd = qualifying_data(claims.eat_nonce, without_tpm)
    except ValueError as e:
        raise _fail("claims_invalid", f"claims cannot be canonicalised: {e}") from None
    pcrs = {int(k): bytes.fromhex(v) for k, v in tpm.pcrs.items()}
    att = verify_quote(
        attest,
        signature,
        ak,
        expected_extra_data=expected_qd,
        pcr_bank=tpm.pcr_bank,
        pcrs=pcrs,
    )
    checks["tpm_quote"] = "ok"
    ci = att.clock_info
    _check_copies(tpm, ci, att.firmware_version)
    if expected_pcrs is not None:
        for index, value in sorted(expected_pcrs.items()):
            got = pcrs.get(index)
            if got is None or not hmac.compare_digest(got.hex().encode(), value.lower().encode()):
                raise _fail("tpm_pcr_value", f"PCR {index} differs from its reference value")
        checks["tpm_pcr_values"] = "ok"

    prev = previous.tpm_clock if previous is not None else None
    if prev is not None:
        if ci.reset_count < prev.reset_count:
            raise _fail(
                "tpm_reset_back",
                f"TPM resetCount went back from {prev.reset_count} to {ci.reset_count} "
                "(TPM state rolled back or another TPM)",
            )
        same_boot = ci.reset_count == prev.reset_count
        if same_boot and ci.restart_count < prev.restart_count:
            raise _fail(
                "tpm_restart_back",
                f"TPM restartCount went back from {prev.restart_count} to {ci.restart_count}",
            )
        same_epoch = same_boot and ci.restart_count == prev.restart_count
        if ci.clock < prev.clock and (same_epoch or ci.safe):
            raise _fail("tpm_clock_back", f"TPM clock went back from {prev.clock} to {ci.clock} ms")
        if not same_boot:
            notes.append("tpm_reset_since_previous")
        elif not same_epoch:
            notes.append("tpm_restart_since_previous")
        checks["tpm_monotonic"] = "ok"
    else:
        checks["tpm_monotonic"] = "skipped: no previous quote"
    return ci, ak_thumb


def _b64(value: str, reason: str, what: str) -> bytes:
    try:
        return b64url_decode(value, what)
    except VerificationError:
        raise _fail(reason, f"{what} is not canonical base64url") from None


def _check_copies(tpm: TpmQuote, ci: ClockInfo, firmware: int) -> None:
    copies = (
        (tpm.clock, ci.clock),
        (tpm.reset_count, ci.reset_count),
        (tpm.restart_count, ci.restart_count),
        (tpm.safe, ci.safe),
        (tpm.firmware_version, f"{firmware:016x}"),
    )
    if any(claimed != signed for claimed, signed in copies):
        raise _fail(
            "tpm_clock_mismatch",
            "clock, resetCount, restartCount, safe or firmware_version differ from the quote",
        )
