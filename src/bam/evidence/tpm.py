"""TPM 2.0 access through tpm2-pytss (ESAPI): attestation key, signing key, quotes, PCRs.

Keys are *primary* keys derived from the TPM's hierarchy seeds with a fixed template, so the
same TPM always yields the same keys without storing any blob on disk, and their private parts
never leave the TPM (``fixedTPM``):

- the attestation key (AK): restricted ECDSA P-256/SHA-256 signing key in the **endorsement**
  hierarchy (keys there see clock, resetCount and restartCount un-obfuscated, which the
  monotonicity checks need);
- the signing key: unrestricted ECDSA P-256/SHA-256 key in the owner hierarchy, for ES256
  evidence tokens (see :class:`bam.evidence.keys.tpm.TpmSigner`).

A swtpm (or a TPM without a resource manager) leaks transient objects when a client forgets
them, and fails with ``TPM_RC_OBJECT_MEMORY`` (0x902) after three; :class:`TpmDevice` is a
context manager that flushes every handle it created, even on error.

Quote *verification* does not live here: see :mod:`bam.evidence.quote` (pure Python).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from bam.evidence.errors import TpmError
from bam.evidence.keys.base import public_key_to_jwk
from bam.evidence.quote import parse_attest, pcr_digest

DEFAULT_TCTI = "device:/dev/tpmrm0"
TCTI_ENV = "BAM_TPM_TCTI"
DEFAULT_PCRS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
AK_UNIQUE = b"BAM attestation key v1"
SIGNING_UNIQUE = b"BAM signing key v1"


@dataclass(frozen=True)
class QuoteResult:
    """What a quote returns: the signed TPMS_ATTEST, its TPMT_SIGNATURE and the PCR values."""

    attest: bytes
    signature: bytes
    pcr_bank: str
    pcrs: dict[int, bytes]


def default_tcti() -> str:
    """``$BAM_TPM_TCTI`` or the kernel resource manager ``device:/dev/tpmrm0``."""
    return os.environ.get(TCTI_ENV) or DEFAULT_TCTI


def _pytss() -> Any:
    try:
        import tpm2_pytss
    except ImportError:
        raise TpmError(
            "tpm_unavailable",
            "tpm2-pytss is not installed (pip install 'bam[tpm]'; it needs libtss2-dev)",
        ) from None
    return tpm2_pytss


class TpmDevice:
    """One ESAPI connection; keys are created on first use and flushed on :meth:`close`."""

    def __init__(self, tcti: str | None = None) -> None:
        self.tcti = tcti or default_tcti()
        self._t: Any = None
        self._esys: Any = None
        self._handles: dict[str, tuple[Any, Any]] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> Self:
        if self._esys is None:
            self._t = _pytss()
            try:
                self._esys = self._t.ESAPI(self.tcti)
            except self._t.TSS2_Exception as e:
                raise TpmError(
                    "tpm_unavailable", f"cannot open the TPM via TCTI {self.tcti!r}: {e}"
                ) from None
        return self

    def close(self) -> None:
        """Flush every transient handle this device created, then close the connection."""
        esys, self._esys = self._esys, None
        if esys is None:
            return
        handles, self._handles = self._handles, {}
        try:
            for handle, _ in handles.values():
                with contextlib.suppress(self._t.TSS2_Exception):  # the TPM may be gone
                    esys.flush_context(handle)
        finally:
            esys.close()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ctx(self) -> Any:
        if self._esys is None:
            self.open()
        return self._esys

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._t.TSS2_Exception as e:
            if e.rc == int(self._t.TPM2_RC.OBJECT_MEMORY):
                raise TpmError(
                    "tpm_object_memory",
                    f"{what}: TPM out of object memory; transient handles leaked by another "
                    "client (no resource manager). Flush them (tpm2_flushcontext -t) or use "
                    "/dev/tpmrm0",
                ) from None
            raise TpmError("tpm_failed", f"{what} failed: {e}") from None

    # -- keys --------------------------------------------------------------------------------
    def _primary(self, which: str) -> tuple[Any, Any]:
        if which in self._handles:
            return self._handles[which]
        t, esys = self._t, self._ctx()
        attrs = (
            t.TPMA_OBJECT.SIGN_ENCRYPT
            | t.TPMA_OBJECT.FIXEDTPM
            | t.TPMA_OBJECT.FIXEDPARENT
            | t.TPMA_OBJECT.SENSITIVEDATAORIGIN
            | t.TPMA_OBJECT.USERWITHAUTH
        )
        if which == "ak":
            attrs |= t.TPMA_OBJECT.RESTRICTED
            hierarchy, unique = t.ESYS_TR.ENDORSEMENT, AK_UNIQUE
        else:
            hierarchy, unique = t.ESYS_TR.OWNER, SIGNING_UNIQUE
        template = t.TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256:null", objectAttributes=attrs, nameAlg="sha256"
        )
        template.publicArea.unique.ecc.x = unique
        handle, public, *_ = self._call(
            f"creating the {which} key", esys.create_primary, None, template, hierarchy
        )
        self._handles[which] = (handle, public)
        return handle, public

    def _jwk(self, which: str) -> dict[str, str]:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        _, public = self._primary(which)
        key = load_pem_public_key(public.publicArea.to_pem())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TpmError("tpm_failed", f"the TPM {which} key is not an EC key")
        return public_key_to_jwk(key)

    def ak_jwk(self) -> dict[str, str]:
        """Public JWK of the attestation key (for enrolment and in every quote)."""
        return self._jwk("ak")

    def signing_jwk(self) -> dict[str, str]:
        """Public JWK of the non-exportable ES256 token-signing key."""
        return self._jwk("sign")

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA P-256 signature of a sha256 ``digest`` as JWS ``r || s`` (64 bytes)."""
        if len(digest) != 32:
            raise TpmError("tpm_failed", "sign_digest needs a 32-byte sha256 digest")
        t = self._t if self._t is not None else _pytss()
        handle, _ = self._primary("sign")
        scheme = t.TPMT_SIG_SCHEME(
            scheme=t.TPM2_ALG.ECDSA,
            details=t.TPMU_SIG_SCHEME(ecdsa=t.TPMS_SCHEME_HASH(hashAlg=t.TPM2_ALG.SHA256)),
        )
        ticket = t.TPMT_TK_HASHCHECK(tag=t.TPM2_ST.HASHCHECK, hierarchy=t.TPM2_RH.NULL)
        sig = self._call("signing", self._esys.sign, handle, t.TPM2B_DIGEST(digest), scheme, ticket)
        r = bytes(sig.signature.ecdsa.signatureR)
        s = bytes(sig.signature.ecdsa.signatureS)
        return r.rjust(32, b"\0") + s.rjust(32, b"\0")

    # -- PCRs and quotes ---------------------------------------------------------------------
    @staticmethod
    def _selection_text(bank: str, pcrs: Sequence[int]) -> str:
        if not pcrs or any(not 0 <= i <= 23 for i in pcrs):
            raise TpmError("tpm_failed", "PCR indices must be 0..23 and at least one")
        return f"{bank}:" + ",".join(str(i) for i in sorted(set(pcrs)))

    def read_pcrs(self, pcrs: Sequence[int], bank: str = "sha256") -> dict[int, bytes]:
        """Current values of ``pcrs`` in ``bank`` (read in chunks of 8, the TPM's limit)."""
        t, esys = self._t or _pytss(), self._ctx()
        wanted = sorted(set(pcrs))
        self._selection_text(bank, wanted)
        out: dict[int, bytes] = {}
        for start in range(0, len(wanted), 8):
            chunk = wanted[start : start + 8]
            sel = t.TPML_PCR_SELECTION.parse(self._selection_text(bank, chunk))
            _, sel_out, digests = self._call("reading PCRs", esys.pcr_read, sel)
            got = [i for i in chunk if i in _selected(sel_out)]
            if len(got) != len(chunk) or len(digests) != len(chunk):
                raise TpmError("tpm_failed", f"the TPM has no {bank} bank for PCRs {chunk}")
            out.update(zip(chunk, (bytes(d) for d in digests), strict=True))
        return out

    def extend_pcr(self, index: int, data: bytes, bank: str = "sha256") -> None:
        """Extend PCR ``index`` with ``H(data)`` (for demos and tests: PCRs 16 and 23)."""
        t, esys = self._t or _pytss(), self._ctx()
        alg = getattr(t.TPM2_ALG, bank.upper())
        digest = hashlib.new(bank, data).digest()
        ha = t.TPMU_HA(**{bank: digest})
        values = t.TPML_DIGEST_VALUES([t.TPMT_HA(hashAlg=alg, digest=ha)])
        handle = getattr(t.ESYS_TR, f"PCR{index}")
        self._call("extending a PCR", esys.pcr_extend, handle, values)

    def quote(
        self, qualifying_data: bytes, pcrs: Sequence[int] = DEFAULT_PCRS, bank: str = "sha256"
    ) -> QuoteResult:
        """Quote ``pcrs`` with the AK over ``qualifying_data``; the values match the quote.

        PCRs are read around the quote; if one was extended in between (the digest differs),
        the quote is retried.
        """
        if len(qualifying_data) > 64:
            raise TpmError("tpm_failed", "qualifying data is at most 64 bytes")
        t, esys = self._t or _pytss(), self._ctx()
        handle, _ = self._primary("ak")
        sel = t.TPML_PCR_SELECTION.parse(self._selection_text(bank, pcrs))
        scheme = t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL)
        for _ in range(5):
            values = self.read_pcrs(pcrs, bank)
            attest2b, signature = self._call(
                "quoting", esys.quote, handle, sel, t.TPM2B_DATA(qualifying_data), scheme
            )
            attest = bytes(attest2b)
            att = parse_attest(attest)
            if att.pcr_digest == pcr_digest([values[i] for i in sorted(values)], "sha256"):
                return QuoteResult(attest, bytes(signature.marshal()), bank, values)
        raise TpmError("tpm_failed", "PCRs kept changing during the quote")


def _selected(sel: Any) -> set[int]:
    out: set[int] = set()
    for i in range(sel.count):
        s = sel.pcrSelections[i]
        bitmap = bytes(s.pcrSelect)[: s.sizeofSelect]
        out.update(j * 8 + b for j, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)
    return out
