"""Build and sign evidence tokens: an EAT (RFC 9711) as a compact JWS (``typ: eat+jwt``).

The token is signed by a :class:`~bam.evidence.keys.base.Signer` (software Ed25519 → ``EdDSA``,
TPM P-256 → ``ES256``). Compact serialisation is done here rather than by a JOSE library
because the signature may come from a TPM; verification, where mistakes are costly, is
strict and checked against an independent JOSE library in the tests (see
:mod:`bam.evidence.verify`).

Chain: each agent numbers its tokens (``bam_seq`` = 1, 2, …) and puts the sha256 of the
previous token's exact text in ``bam_prev`` (64 zeros for the first). A verifier holding token
*n* can then prove token *n+1* follows it with nothing in between. :class:`FileChain` keeps the
chain state across restarts (written atomically, before the token is returned).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from bam.evidence.canonical import (
    ZERO_DIGEST,
    b64url_decode,
    b64url_encode,
    compact_json,
    sha256_hex,
)
from bam.evidence.claims import (
    EAT_PROFILE,
    TOKEN_TYP,
    BehaviorSummary,
    Measurements,
    files_sha256,
)
from bam.evidence.errors import EvidenceError
from bam.evidence.keys.base import ALLOWED_ALGS, Signer, ueid_for
from bam.evidence.quote import parse_attest, qualifying_data
from bam.evidence.tpm import DEFAULT_PCRS, QuoteResult

NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{8,88}$")


def token_digest(token: str | bytes) -> str:
    """sha256 (hex) of a token's exact compact text: what the next token's ``bam_prev`` holds."""
    return sha256_hex(token.encode("ascii") if isinstance(token, str) else bytes(token))


@dataclass(frozen=True)
class ChainState:
    """The last token this agent issued: its sequence number and digest."""

    seq: int = 0
    prev: str = ZERO_DIGEST


class ChainStore(Protocol):
    def load(self) -> ChainState: ...
    def save(self, state: ChainState) -> None: ...


class MemoryChain:
    """Chain state in memory (tests, benchmarks, one-shot tokens)."""

    def __init__(self, state: ChainState | None = None) -> None:
        self.state = state or ChainState()

    def load(self) -> ChainState:
        return self.state

    def save(self, state: ChainState) -> None:
        self.state = state


class FileChain:
    """Chain state in a small JSON file, replaced atomically (mode 0600)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> ChainState:
        try:
            data = json.loads(self.path.read_text())
            seq, prev = data["seq"], data["prev"]
        except FileNotFoundError:
            return ChainState()
        except (OSError, ValueError, KeyError, TypeError):
            raise EvidenceError(
                "chain_state_invalid", f"{self.path} is not a chain state"
            ) from None
        if (
            not isinstance(seq, int)
            or not isinstance(prev, str)
            or not re.fullmatch(r"[0-9a-f]{64}", prev)
        ):
            raise EvidenceError("chain_state_invalid", f"{self.path} is not a chain state")
        return ChainState(seq, prev)

    def save(self, state: ChainState) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps({"seq": state.seq, "prev": state.prev}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


class QuoteSource(Protocol):
    """What the builder needs from a TPM (:class:`bam.evidence.tpm.TpmDevice` provides it)."""

    def ak_jwk(self) -> dict[str, str]: ...

    def quote(
        self, qualifying_data: bytes, pcrs: Sequence[int] = ..., bank: str = ...
    ) -> QuoteResult: ...


@dataclass(frozen=True)
class Evidence:
    """A signed token and its digest (the next token's ``bam_prev``)."""

    token: str
    digest: str

    @cached_property
    def claims(self) -> dict[str, Any]:
        """The claims exactly as signed (parsed from the token; not verified again)."""
        payload = self.token.split(".")[1]
        value: dict[str, Any] = json.loads(b64url_decode(payload, "payload"))
        return value


def tpm_claim(quote: QuoteResult, ak_jwk: dict[str, str]) -> dict[str, Any]:
    """The ``submods.tpm`` claim for a quote (signed values copied out for readability)."""
    att = parse_attest(quote.attest)
    return {
        "ak": dict(ak_jwk),
        "pcr_bank": quote.pcr_bank,
        "pcrs": {str(i): v.hex() for i, v in sorted(quote.pcrs.items())},
        "attest": b64url_encode(quote.attest),
        "signature": b64url_encode(quote.signature),
        "clock": att.clock_info.clock,
        "reset_count": att.clock_info.reset_count,
        "restart_count": att.clock_info.restart_count,
        "safe": att.clock_info.safe,
        "firmware_version": f"{att.firmware_version:016x}",
    }


def sign_compact(header: dict[str, Any], claims: dict[str, Any], signer: Signer) -> str:
    """Compact JWS ``b64(header).b64(payload).b64(signature)``."""
    signing_input = b64url_encode(compact_json(header)) + "." + b64url_encode(compact_json(claims))
    signature = signer.sign(signing_input.encode("ascii"))
    return signing_input + "." + b64url_encode(signature)


def _json(value: object) -> str:
    return json.dumps(
        value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    )


class EvidenceBuilder:
    """Produces the next token of one agent's chain.

    ``tpm`` (optional) adds a quote whose qualifying data binds the nonce and every other
    claim; without it the token is still complete — nothing here assumes a TPM.

    Submodule models are immutable, so the JSON of the most recently used measurement and
    behaviour objects is cached by identity: consecutive windows usually carry the same
    measurements, and re-serialising them dominated the cost of a token. The cache holds
    enough for an agent that watches many workloads (one measurements object each).

    Measurements always carry ``files_sha256``; ``build(..., files_by_reference=True)`` sends
    the digest without the list, for a verifier known to hold it (see
    :class:`~bam.evidence.claims.Measurements`). Knowing that is the caller's business: the
    builder only signs what it is told.
    """

    FRAGMENTS = 128
    """Cached submodule serialisations (least recently used dropped first)."""

    def __init__(
        self,
        signer: Signer,
        *,
        chain: ChainStore | None = None,
        tpm: QuoteSource | None = None,
        pcrs: Sequence[int] = DEFAULT_PCRS,
        pcr_bank: str = "sha256",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if signer.alg not in ALLOWED_ALGS:
            raise EvidenceError("alg_not_allowed", f"signer algorithm {signer.alg!r}")
        self.signer = signer
        self.chain = chain if chain is not None else MemoryChain()
        self.tpm = tpm
        self.pcrs = tuple(pcrs)
        self.pcr_bank = pcr_bank
        self.clock = clock
        self.kid = signer.thumbprint()
        self.ueid = ueid_for(self.kid)
        self._header_b64 = b64url_encode(
            compact_json({"alg": signer.alg, "typ": TOKEN_TYP, "kid": self.kid})
        )
        self._ak_jwk: dict[str, str] | None = None
        self._fragments: OrderedDict[tuple[int, bool], tuple[BaseModel, dict[str, Any], str]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def _fragment(self, model: BaseModel, by_reference: bool = False) -> tuple[dict[str, Any], str]:
        key = (id(model), by_reference)
        hit = self._fragments.get(key)
        if hit is not None and hit[0] is model:
            self._fragments.move_to_end(key)
            return hit[1], hit[2]
        if by_reference:  # the full fragment without its list (dumped and digested once)
            full = self._fragment(model)[0]
            value = {**full, "files": []} if full.get("files") else full
        else:
            value = model.model_dump(mode="json", exclude_none=True)
            if isinstance(model, Measurements) and value["files"]:
                value.setdefault("files_sha256", files_sha256(value["files"]))
        text = _json(value)
        self._fragments[key] = (model, value, text)
        if len(self._fragments) > self.FRAGMENTS:
            self._fragments.popitem(last=False)
        return value, text

    def files_digest(self, measurements: Measurements) -> str | None:
        """The ``files_sha256`` a token for ``measurements`` carries (``None``: no files)."""
        with self._lock:
            digest: str | None = self._fragment(measurements)[0].get("files_sha256")
        return digest

    def build(
        self,
        nonce: str,
        measurements: Measurements,
        behavior: BehaviorSummary | None = None,
        *,
        files_by_reference: bool = False,
    ) -> Evidence:
        """Sign the next token for verifier-issued ``nonce``; advances the chain state.

        ``files_by_reference``: give the measured files by their digest only (the verifier
        must already hold that list; it refuses the token with ``measurements_unknown``
        otherwise).
        """
        if not isinstance(nonce, str) or not NONCE_RE.fullmatch(nonce):
            raise EvidenceError("nonce_invalid", "the nonce must be 8-88 base64url characters")
        with self._lock:
            state = self.chain.load()
            top: dict[str, Any] = {
                "eat_profile": EAT_PROFILE,
                "iat": int(self.clock()),
                "eat_nonce": nonce,
                "ueid": self.ueid,
                "bam_seq": state.seq + 1,
                "bam_prev": state.prev,
            }
            values: dict[str, Any] = {}
            texts: dict[str, str] = {}
            values["measurements"], texts["measurements"] = self._fragment(
                measurements, files_by_reference
            )
            if behavior is not None:
                values["behavior"], texts["behavior"] = self._fragment(behavior)
            if self.tpm is not None:
                if self._ak_jwk is None:
                    self._ak_jwk = self.tpm.ak_jwk()
                qd = qualifying_data(nonce, {**top, "submods": values})
                quote = self.tpm.quote(qd, self.pcrs, self.pcr_bank)
                texts["tpm"] = _json(tpm_claim(quote, self._ak_jwk))
            # The same text compact_json() would produce, composed from cached fragments.
            items = {k: _json(v) for k, v in top.items()}
            items["submods"] = "{" + ",".join(f"{_json(k)}:{texts[k]}" for k in sorted(texts)) + "}"
            payload = "{" + ",".join(f"{_json(k)}:{items[k]}" for k in sorted(items)) + "}"
            signing_input = self._header_b64 + "." + b64url_encode(payload.encode("utf-8"))
            signature = self.signer.sign(signing_input.encode("ascii"))
            token = signing_input + "." + b64url_encode(signature)
            digest = hashlib.sha256(token.encode("ascii")).hexdigest()
            self.chain.save(ChainState(state.seq + 1, digest))
        return Evidence(token=token, digest=digest)
