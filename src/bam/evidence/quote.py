"""TPM 2.0 quotes in pure Python: parse TPMS_ATTEST / TPMT_SIGNATURE and verify them.

The verifier never needs a TPM or the TSS: :func:`verify_quote` uses ``struct`` and
``cryptography`` only. Parsing is strict (exact lengths, no trailing bytes, bounded counts) and
raises only :class:`~bam.evidence.errors.VerificationError`, whatever the input.

Layouts (TPM 2.0 Library, Part 2), all big-endian:

- TPMS_ATTEST: magic u32 (``TPM_GENERATED_VALUE``), type u16 (``TPM_ST_ATTEST_QUOTE``),
  qualifiedSigner TPM2B_NAME, extraData TPM2B_DATA, clockInfo {clock u64, resetCount u32,
  restartCount u32, safe u8}, firmwareVersion u64, TPMS_QUOTE_INFO {TPML_PCR_SELECTION,
  pcrDigest TPM2B_DIGEST};
- TPMT_SIGNATURE (ECDSA): sigAlg u16, hash u16, signatureR TPM2B, signatureS TPM2B.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from bam.evidence.canonical import jcs
from bam.evidence.errors import VerificationError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_ECDSA = 0x0018

HASH_ALGS: dict[int, str] = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
HASH_IDS: dict[str, int] = {v: k for k, v in HASH_ALGS.items()}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_CURVE_HASH = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}


@dataclass(frozen=True)
class ClockInfo:
    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class Attest:
    """A parsed quote TPMS_ATTEST."""

    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_select: tuple[tuple[str, tuple[int, ...]], ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class TpmSignature:
    sig_alg: int
    hash_alg: str
    r: int
    s: int


class _Reader:
    __slots__ = ("data", "pos", "reason", "what")

    def __init__(self, data: bytes, reason: str, what: str) -> None:
        self.data, self.pos, self.reason, self.what = data, 0, reason, what

    def fail(self, message: str) -> VerificationError:
        return VerificationError(self.reason, f"{self.what}: {message}")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"truncated at byte {self.pos} (need {n} more)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        v: int = struct.unpack(">H", self.take(2))[0]
        return v

    def u32(self) -> int:
        v: int = struct.unpack(">I", self.take(4))[0]
        return v

    def u64(self) -> int:
        v: int = struct.unpack(">Q", self.take(8))[0]
        return v

    def tpm2b(self, limit: int) -> bytes:
        n = self.u16()
        if n > limit:
            raise self.fail(f"field of {n} bytes exceeds the {limit}-byte limit")
        return self.take(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} trailing bytes")


def parse_attest(data: bytes) -> Attest:
    """Parse a quote's TPMS_ATTEST; anything but a well-formed TPM-generated quote is refused."""
    if not isinstance(data, bytes | bytearray) or len(data) > 4096:
        raise VerificationError("tpm_attest_malformed", "TPMS_ATTEST: not bytes or too long")
    r = _Reader(bytes(data), "tpm_attest_malformed", "TPMS_ATTEST")
    if r.u32() != TPM_GENERATED_VALUE:
        raise r.fail("magic is not TPM_GENERATED_VALUE (not produced by a TPM)")
    if r.u16() != TPM_ST_ATTEST_QUOTE:
        raise r.fail("not a quote (type is not TPM_ST_ATTEST_QUOTE)")
    signer = r.tpm2b(68)  # TPM2B_NAME: hash alg + digest
    extra = r.tpm2b(64)  # TPM2B_DATA
    clock, reset, restart, safe = r.u64(), r.u32(), r.u32(), r.u8()
    if safe > 1:
        raise r.fail("clockInfo.safe is not a boolean")
    firmware = r.u64()
    count = r.u32()
    if count > 16:
        raise r.fail(f"{count} PCR banks selected (at most 16)")
    selection: list[tuple[str, tuple[int, ...]]] = []
    for _ in range(count):
        alg = r.u16()
        size = r.u8()
        if size > 32:
            raise r.fail("PCR select bitmap too long")
        bitmap = r.take(size)
        name = HASH_ALGS.get(alg)
        if name is None:
            raise r.fail(f"unknown PCR bank hash 0x{alg:04x}")
        pcrs = tuple(i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)
        selection.append((name, pcrs))
    digest = r.tpm2b(64)
    r.end()
    return Attest(
        qualified_signer=signer,
        extra_data=extra,
        clock_info=ClockInfo(clock, reset, restart, bool(safe)),
        firmware_version=firmware,
        pcr_select=tuple(selection),
        pcr_digest=digest,
    )


def parse_signature(data: bytes) -> TpmSignature:
    """Parse a TPMT_SIGNATURE; only ECDSA is accepted (BAM's attestation keys are ECC)."""
    if not isinstance(data, bytes | bytearray) or len(data) > 1024:
        raise VerificationError("tpm_signature_malformed", "TPMT_SIGNATURE: not bytes or too long")
    r = _Reader(bytes(data), "tpm_signature_malformed", "TPMT_SIGNATURE")
    alg = r.u16()
    if alg != TPM_ALG_ECDSA:
        raise r.fail(f"signature algorithm 0x{alg:04x} is not ECDSA")
    hash_id = r.u16()
    hash_name = HASH_ALGS.get(hash_id)
    if hash_name is None or hash_name not in _HASHES:
        raise r.fail(f"signature hash 0x{hash_id:04x} is not allowed")
    sig_r = int.from_bytes(r.tpm2b(66), "big")
    sig_s = int.from_bytes(r.tpm2b(66), "big")
    r.end()
    return TpmSignature(alg, hash_name, sig_r, sig_s)


def pcr_digest(values: Sequence[bytes], hash_name: str = "sha256") -> bytes:
    """Digest of the concatenated PCR values, as a quote's pcrDigest is computed."""
    return hashlib.new(hash_name, b"".join(values)).digest()


def qualifying_data(nonce: str, claims_without_tpm: Mapping[str, Any]) -> bytes:
    """``sha256(nonce || sha256(JCS(claims without submods.tpm)))``.

    ``nonce`` contributes its UTF-8 bytes (nonces are base64url text). One TPM signature over
    this value covers the nonce (freshness) and every other claim (measurements, behaviour).
    """
    body = hashlib.sha256(jcs(claims_without_tpm)).digest()
    return hashlib.sha256(nonce.encode("utf-8") + body).digest()


def verify_quote(
    attest: bytes,
    signature: bytes,
    ak: ec.EllipticCurvePublicKey,
    *,
    expected_extra_data: bytes,
    pcr_bank: str,
    pcrs: Mapping[int, bytes],
) -> Attest:
    """Verify a quote completely; return the parsed attest or raise with a specific reason.

    Order: parse → signature by ``ak`` → qualifying data → PCR selection → PCR digest.
    """
    att = parse_attest(attest)
    sig = parse_signature(signature)
    expected_hash = _CURVE_HASH.get(ak.curve.name)
    if expected_hash is None or sig.hash_alg != expected_hash:
        raise VerificationError(
            "tpm_quote_signature",
            f"quote signed with ECDSA-{sig.hash_alg}; the {ak.curve.name} AK requires "
            f"ECDSA-{expected_hash}",
        )
    try:
        der = encode_dss_signature(sig.r, sig.s)
        ak.verify(der, bytes(attest), ec.ECDSA(_HASHES[sig.hash_alg]()))
    except (InvalidSignature, ValueError):
        raise VerificationError(
            "tpm_quote_signature", "quote signature does not verify with the attestation key"
        ) from None
    if not hmac.compare_digest(att.extra_data, expected_extra_data):
        raise VerificationError(
            "tpm_qualifying_data",
            "quote was made over other data: its qualifying data is not "
            "sha256(nonce || sha256(JCS(claims without submods.tpm)))",
        )
    indices = tuple(sorted(pcrs))
    if att.pcr_select != ((pcr_bank, indices),):
        quoted = "; ".join(f"{bank}:{list(sel)}" for bank, sel in att.pcr_select) or "none"
        raise VerificationError(
            "tpm_pcr_selection",
            f"quote covers PCRs {quoted}, but the token lists {pcr_bank}:{list(indices)}",
        )
    digest = pcr_digest([pcrs[i] for i in indices], sig.hash_alg)
    if not hmac.compare_digest(digest, att.pcr_digest):
        raise VerificationError(
            "tpm_pcr_digest", "the PCR values in the token do not match the quote's PCR digest"
        )
    return att


def checkquote_pcr_file(pcr_bank: str, pcrs: Mapping[int, bytes]) -> bytes:
    """PCR values in the ``tpm2_quote -o`` layout that ``tpm2_checkquote -f`` reads.

    That layout is tpm2-tools' in-memory C structs (little-endian on x86): a TPML_PCR_SELECTION
    (count u32 + 16 x {hash u16, sizeofSelect u8, pcrSelect[4], pad}), then the number of
    TPML_DIGEST that follow (u32), each {count u32, 8 x {size u16, buffer[64]}}.
    """
    indices = sorted(pcrs)
    bitmap = bytearray(4)
    for i in indices:
        bitmap[i // 8] |= 1 << (i % 8)
    out = bytearray(struct.pack("<I", 1))
    out += struct.pack("<HB4sx", HASH_IDS[pcr_bank], 3, bytes(bitmap))
    out += bytes(8 * 15)
    chunks = [indices[i : i + 8] for i in range(0, len(indices), 8)]
    out += struct.pack("<I", len(chunks))
    for chunk in chunks:
        out += struct.pack("<I", len(chunk))
        for k in range(8):
            value = pcrs[chunk[k]] if k < len(chunk) else b""
            out += struct.pack("<H64s", len(value), value)
    return bytes(out)


def export_checkquote_files(token: str, out_dir: str | Path) -> dict[str, Path]:
    """Write a token's quote as the files ``tpm2_checkquote`` takes (for independent checks).

    Files: ``ak.pem`` (``-u``), ``attest.bin`` (``-m``), ``signature.bin`` (``-s``),
    ``pcrs.bin`` (``-f``), ``qualifying.hex`` (``-q``, recomputed from the claims). The JWS
    signature is not checked here: use ``bam report verify`` for that.
    """
    from bam.evidence.canonical import b64url_decode, strict_json_object
    from bam.evidence.claims import TpmQuote
    from bam.evidence.keys.base import VerificationKey

    parts = token.strip().split(".")
    if len(parts) != 3:
        raise VerificationError("malformed", "token is not a compact JWS")
    payload = strict_json_object(b64url_decode(parts[1], "payload"), "claims")
    submods = payload.get("submods")
    if not isinstance(submods, dict) or submods.get("tpm") is None:
        raise VerificationError("tpm_missing", "the token has no TPM quote")
    try:
        tpm = TpmQuote.model_validate(submods["tpm"])
    except ValueError:
        raise VerificationError(
            "claims_invalid", "submods.tpm is not a valid quote claim"
        ) from None
    nonce = payload.get("eat_nonce")
    if not isinstance(nonce, str):
        raise VerificationError("claims_invalid", "eat_nonce is missing")
    without = dict(payload)
    without["submods"] = {k: v for k, v in submods.items() if k != "tpm"}
    try:
        qd = qualifying_data(nonce, without)
    except ValueError as e:
        raise VerificationError("claims_invalid", str(e)) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "ak": out / "ak.pem",
        "attest": out / "attest.bin",
        "signature": out / "signature.bin",
        "pcrs": out / "pcrs.bin",
        "qualifying": out / "qualifying.hex",
    }
    files["ak"].write_text(VerificationKey.from_jwk(tpm.ak).pem())
    files["attest"].write_bytes(b64url_decode(tpm.attest, "attest"))
    files["signature"].write_bytes(b64url_decode(tpm.signature, "signature"))
    pcrs = {int(k): bytes.fromhex(v) for k, v in tpm.pcrs.items()}
    files["pcrs"].write_bytes(checkquote_pcr_file(tpm.pcr_bank, pcrs))
    files["qualifying"].write_text(qd.hex() + "\n")
    return files
