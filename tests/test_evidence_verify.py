"""Verification failures: each attack fails, and for its own stated reason."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from bam.evidence import (
    EvidenceBuilder,
    NonceBook,
    SoftwareSigner,
    VerificationError,
    VerificationKey,
    new_nonce,
    verify_token,
)
from bam.evidence.canonical import ZERO_DIGEST
from bam.evidence.token import MemoryChain, sign_compact
from bam.evidence.verify import VerifiedEvidence
from evidence_support import b64e, decode, make_behavior, make_measurements, resign

NOW = 1_750_000_000.0


class Agent:
    """An agent with a software key and a chain; tokens built at a controllable time."""

    def __init__(self) -> None:
        self.signer = SoftwareSigner.generate()
        self.vk = VerificationKey.from_signer(self.signer)
        self.now = NOW
        self.builder = EvidenceBuilder(self.signer, clock=lambda: self.now)

    def token(self, nonce: str | None = None) -> tuple[str, str]:
        nonce = nonce or new_nonce()
        return self.builder.build(nonce, make_measurements(), make_behavior()).token, nonce

    def verify(self, token: str, **kw: Any) -> VerifiedEvidence:
        kw.setdefault("now", NOW + 1)
        return verify_token(token, self.vk, **kw)


@pytest.fixture
def agent() -> Agent:
    return Agent()


def _reason(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(VerificationError) as e:
        fn(*args, **kw)
    return e.value.reason


def test_a_good_token_verifies(agent: Agent) -> None:
    token, nonce = agent.token()
    v = agent.verify(token, nonce=nonce)
    assert v.claims.eat_nonce == nonce
    assert v.checks["signature"] == "ok"
    assert v.checks["nonce"] == "ok"
    assert v.summary()["claims"] == decode(token)[1]


# -- signature, key, algorithm -------------------------------------------------------------


def test_wrong_key(agent: Agent) -> None:
    token, nonce = agent.token()
    other = VerificationKey.from_signer(SoftwareSigner.generate())
    assert _reason(verify_token, token, other, nonce=nonce, now=NOW) == "unknown_key"


def test_wrong_key_claiming_the_trusted_kid(agent: Agent) -> None:
    token, nonce = agent.token()
    forger = SoftwareSigner.generate()
    forged = resign(token, forger)  # header keeps the trusted key's kid
    assert decode(forged)[0]["kid"] == agent.vk.kid
    assert _reason(agent.verify, forged, nonce=nonce) == "bad_signature"


def test_altered_claim(agent: Agent) -> None:
    token, nonce = agent.token()
    h, _p, s = token.split(".")
    claims = decode(token)[1]
    claims["submods"]["behavior"]["severity"] = "critical"
    tampered = f"{h}.{b64e(json.dumps(claims).encode())}.{s}"
    assert _reason(agent.verify, tampered, nonce=nonce) == "bad_signature"


def test_alg_none(agent: Agent) -> None:
    token, nonce = agent.token()
    _, p, _ = token.split(".")
    header = {"alg": "none", "typ": "eat+jwt", "kid": agent.vk.kid}
    unsigned = f"{b64e(json.dumps(header).encode())}.{p}."
    assert _reason(agent.verify, unsigned, nonce=nonce) == "alg_not_allowed"


def test_hs256_with_the_public_key_as_secret(agent: Agent) -> None:
    token, nonce = agent.token()
    _, p, _ = token.split(".")
    header = b64e(json.dumps({"alg": "HS256", "typ": "eat+jwt", "kid": agent.vk.kid}).encode())
    for secret in (agent.vk.pem().encode(), json.dumps(agent.vk.jwk).encode()):
        mac = hmac.new(secret, f"{header}.{p}".encode(), hashlib.sha256).digest()
        confused = f"{header}.{p}.{b64e(mac)}"
        assert _reason(agent.verify, confused, nonce=nonce) == "alg_not_allowed"


def test_alg_confusion_between_allowed_algorithms(agent: Agent) -> None:
    token, nonce = agent.token()
    h = decode(token)[0]
    confused = resign(token, agent.signer, header={**h, "alg": "ES256"})
    assert _reason(agent.verify, confused, nonce=nonce) == "alg_key_mismatch"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"typ": "JWT"}, "typ_invalid"),
        ({"kid": None}, "header_invalid"),
        ({"jku": "https://evil.example/keys"}, "header_invalid"),
        ({"jwk": {"kty": "OKP"}}, "header_invalid"),
        ({"crit": ["exp"]}, "header_invalid"),
        ({"b64": False}, "header_invalid"),
    ],
)
def test_header_rules(agent: Agent, change: dict[str, Any], reason: str) -> None:
    token, nonce = agent.token()
    h = {**decode(token)[0], **change}
    h = {k: v for k, v in h.items() if v is not None}
    assert _reason(agent.verify, resign(token, agent.signer, header=h), nonce=nonce) == reason


def test_duplicate_header_members_are_refused(agent: Agent) -> None:
    token, nonce = agent.token()
    _, p, s = token.split(".")
    dup = b'{"alg":"EdDSA","alg":"none","typ":"eat+jwt","kid":"x"}'
    assert _reason(agent.verify, f"{b64e(dup)}.{p}.{s}", nonce=nonce) == "malformed"


def test_signature_is_checked_before_claims_are_parsed(agent: Agent) -> None:
    token, nonce = agent.token()
    h, _, s = token.split(".")
    garbage = b64e(b'{"eat_profile": 1, "not": "valid claims"')
    assert _reason(agent.verify, f"{h}.{garbage}.{s}", nonce=nonce) == "bad_signature"


# -- claims ----------------------------------------------------------------------------------


def test_profile(agent: Agent) -> None:
    token, nonce = agent.token()
    other = resign(token, agent.signer, lambda c: c.update(eat_profile="tag:other,2025:x"))
    assert _reason(agent.verify, other, nonce=nonce) == "profile_mismatch"


def test_unknown_claim_is_refused(agent: Agent) -> None:
    token, nonce = agent.token()
    extra = resign(token, agent.signer, lambda c: c.update(admin=True))
    assert _reason(agent.verify, extra, nonce=nonce) == "claims_invalid"


def test_ueid_bound_to_key(agent: Agent) -> None:
    token, nonce = agent.token()
    other = resign(token, agent.signer, lambda c: c.update(ueid="A" * 44))
    assert _reason(agent.verify, other, nonce=nonce) == "ueid_mismatch"


# -- nonce and freshness ---------------------------------------------------------------------


def test_wrong_nonce(agent: Agent) -> None:
    token, _ = agent.token()
    assert _reason(agent.verify, token, nonce=new_nonce()) == "nonce_mismatch"


def test_stale_nonce(agent: Agent) -> None:
    token, nonce = agent.token()
    late = NOW + 301
    assert _reason(agent.verify, token, nonce=nonce, now=late) == "nonce_stale"
    assert agent.verify(token, nonce=nonce, now=late, max_age_s=600).checks["nonce"] == "ok"


def test_token_older_than_its_nonce_is_stale(agent: Agent) -> None:
    token, nonce = agent.token()
    reason = _reason(agent.verify, token, nonce=nonce, nonce_issued_at=NOW + 120)
    assert reason == "nonce_stale"


def test_iat_in_future(agent: Agent) -> None:
    agent.now = NOW + 3600
    token, nonce = agent.token()
    assert _reason(agent.verify, token, nonce=nonce) == "iat_in_future"


def test_reused_nonce(agent: Agent) -> None:
    first, nonce = agent.token()
    prev = agent.verify(first, nonce=nonce)
    replayed_nonce, _ = agent.token(nonce)
    assert _reason(agent.verify, replayed_nonce, nonce=nonce, previous=prev) == "nonce_reused"


def test_nonce_book_is_single_use_and_expires() -> None:
    t = [0.0]
    book = NonceBook(ttl_s=60, clock=lambda: t[0])
    n = book.issue()
    assert book.consume(n) == 0.0
    with pytest.raises(VerificationError) as e:
        book.consume(n)
    assert e.value.reason == "nonce_mismatch"
    n2 = book.issue()
    t[0] = 61.0
    with pytest.raises(VerificationError) as e:
        book.consume(n2)
    assert e.value.reason == "nonce_stale"
    assert len(new_nonce()) == 43


# -- sequence and chain -----------------------------------------------------------------------


def _two(agent: Agent) -> tuple[VerifiedEvidence, str, str]:
    first, n1 = agent.token()
    prev = agent.verify(first, nonce=n1)
    second, n2 = agent.token()
    return prev, second, n2


def test_next_token_verifies_against_previous(agent: Agent) -> None:
    prev, second, nonce = _two(agent)
    assert agent.verify(second, nonce=nonce, previous=prev).checks["chain"] == "ok"


def test_skipped_seq(agent: Agent) -> None:
    prev, second, nonce = _two(agent)
    skipped = resign(second, agent.signer, lambda c: c.update(bam_seq=3))
    assert _reason(agent.verify, skipped, nonce=nonce, previous=prev) == "seq_gap"


def test_repeated_seq(agent: Agent) -> None:
    prev, second, nonce = _two(agent)
    repeated = resign(second, agent.signer, lambda c: c.update(bam_seq=1))
    assert _reason(agent.verify, repeated, nonce=nonce, previous=prev) == "seq_replay"


def test_replay_of_the_previous_token_itself(agent: Agent) -> None:
    prev, _, _ = _two(agent)
    assert _reason(agent.verify, prev.token, previous=prev) == "nonce_reused"


def test_broken_prev(agent: Agent) -> None:
    prev, second, nonce = _two(agent)
    broken = resign(second, agent.signer, lambda c: c.update(bam_prev="f" * 64))
    assert _reason(agent.verify, broken, nonce=nonce, previous=prev) == "chain_broken"


def test_first_token_must_start_the_chain(agent: Agent) -> None:
    token, nonce = agent.token()
    assert decode(token)[1]["bam_prev"] == ZERO_DIGEST
    bad = resign(token, agent.signer, lambda c: c.update(bam_prev="1" * 64))
    assert _reason(agent.verify, bad, nonce=nonce) == "chain_broken"


def test_gap_after_lost_tokens_is_detected(agent: Agent) -> None:
    first, n1 = agent.token()
    prev = agent.verify(first, nonce=n1)
    agent.token()  # issued but never delivered (an attacker dropped it)
    third, n3 = agent.token()
    assert _reason(agent.verify, third, nonce=n3, previous=prev) == "seq_gap"


def test_previous_from_another_agent(agent: Agent) -> None:
    other = Agent()
    t, n = other.token()
    foreign_prev = other.verify(t, nonce=n)
    _, second, nonce = _two(agent)
    reason = _reason(agent.verify, second, nonce=nonce, previous=foreign_prev)
    assert reason == "chain_broken"


def test_tpm_is_enforced_when_required(agent: Agent) -> None:
    token, nonce = agent.token()
    assert _reason(agent.verify, token, nonce=nonce, require_tpm=True) == "tpm_missing"


# -- structure -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "a.b", "a.b.c.d", "é.a.b", "....", "eyJ.eyJ.", "a" * (1 << 20 + 1), "!!.!!.!!"],
)
def test_malformed_tokens(agent: Agent, text: str) -> None:
    assert _reason(agent.verify, text) == "malformed"


def test_non_canonical_base64_is_refused(agent: Agent) -> None:
    token, nonce = agent.token()
    h, p, s = token.split(".")
    # The signature (64 bytes) ends in a 2-character group whose last char has 4 spare bits.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(s[-1])
    twin = s[:-1] + alphabet[last | 1]
    assert twin != s
    assert _reason(agent.verify, f"{h}.{p}.{twin}", nonce=nonce) == "malformed"


def test_no_key_at_all(agent: Agent) -> None:
    token, _ = agent.token()
    assert _reason(verify_token, token, [], now=NOW) == "unknown_key"


def test_key_choice_among_several(agent: Agent) -> None:
    token, nonce = agent.token()
    keys = [VerificationKey.from_signer(SoftwareSigner.generate()), agent.vk]
    assert verify_token(token, keys, nonce=nonce, now=NOW).kid == agent.vk.kid


def test_token_signed_by_a_chain_aware_builder_with_state() -> None:
    signer = SoftwareSigner.generate()
    chain = MemoryChain()
    b = EvidenceBuilder(signer, chain=chain, clock=lambda: NOW)
    b.build(new_nonce(), make_measurements())
    assert chain.state.seq == 1
    header = {"alg": "EdDSA", "typ": "eat+jwt", "kid": signer.thumbprint()}
    raw = sign_compact(header, {"hello": "world"}, signer)
    vk = VerificationKey.from_signer(signer)
    assert _reason(verify_token, raw, vk, now=NOW) == "profile_mismatch"
