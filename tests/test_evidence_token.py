"""Building and signing evidence tokens; checked with an independent JOSE library (joserfc).

BAM verifies signatures itself (libsodium for Ed25519, cryptography for P-256); joserfc, an
independent JOSE library, appears only here, in tests.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from joserfc import jws, jwt
from joserfc.jwk import OKPKey

from bam.evidence import (
    EAT_PROFILE,
    EvidenceBuilder,
    EvidenceClaims,
    EvidenceError,
    FileChain,
    SoftwareSigner,
    VerificationKey,
    new_nonce,
    verify_token,
)
from bam.evidence.canonical import ZERO_DIGEST, b64url_decode, compact_json, sha256_hex
from bam.evidence.keys import ueid_for
from bam.evidence.token import ChainState
from evidence_support import decode, make_behavior, make_measurements


def _joserfc_key(signer: SoftwareSigner) -> OKPKey:
    return OKPKey.import_key(signer.public_jwk())


def test_token_verifies_with_independent_jose_library() -> None:
    signer = SoftwareSigner.generate()
    nonce = new_nonce()
    ev = EvidenceBuilder(signer).build(nonce, make_measurements(), make_behavior())

    with warnings.catch_warnings():
        # joserfc flags the polymorphic "EdDSA" name as superseded by "Ed25519" (RFC 9864);
        # EdDSA is what RFC 9711 and the design pin, and what every JOSE library accepts.
        warnings.simplefilter("ignore")
        obj = jws.deserialize_compact(ev.token, _joserfc_key(signer), algorithms=["EdDSA"])
        token = jwt.decode(ev.token, _joserfc_key(signer), algorithms=["EdDSA"])
    assert obj.headers() == {"alg": "EdDSA", "typ": "eat+jwt", "kid": signer.thumbprint()}
    claims = json.loads(obj.payload)
    assert claims == ev.claims == token.claims
    assert claims["eat_profile"] == EAT_PROFILE
    assert claims["eat_nonce"] == nonce
    assert claims["bam_seq"] == 1
    assert claims["bam_prev"] == ZERO_DIGEST
    assert claims["ueid"] == ueid_for(signer.thumbprint())
    assert set(claims["submods"]) == {"measurements", "behavior"}
    EvidenceClaims.model_validate(claims)  # the shape BAM's verifier expects


def test_payload_is_compact_sorted_json_of_the_claims() -> None:
    signer = SoftwareSigner.generate()
    builder = EvidenceBuilder(signer)
    measurements, behavior = make_measurements(), make_behavior()
    for _ in range(3):  # the second and third reuse cached fragments
        ev = builder.build(new_nonce(), measurements, behavior)
        payload = b64url_decode(ev.token.split(".")[1])
        assert payload == compact_json(ev.claims)
        assert ev.claims["submods"]["behavior"] == behavior.model_dump(
            mode="json", exclude_none=True
        )


def test_kid_is_the_rfc7638_thumbprint_joserfc_computes() -> None:
    signer = SoftwareSigner.generate()
    assert signer.thumbprint() == _joserfc_key(signer).thumbprint()


def test_chain_links_each_token_to_the_previous_one() -> None:
    signer = SoftwareSigner.generate()
    builder = EvidenceBuilder(signer)
    vk = VerificationKey.from_signer(signer)
    previous = None
    for seq in range(1, 5):
        nonce = new_nonce()
        ev = builder.build(nonce, make_measurements())
        assert ev.claims["bam_seq"] == seq
        assert ev.digest == sha256_hex(ev.token.encode())
        if previous is not None:
            assert ev.claims["bam_prev"] == previous.digest
        previous = verify_token(ev.token, vk, nonce=nonce, previous=previous)
        assert previous.checks["chain"].startswith("ok")


def test_file_chain_survives_a_restart(tmp_path: Path) -> None:
    signer = SoftwareSigner.generate()
    chain_file = tmp_path / "chain.json"
    first = EvidenceBuilder(signer, chain=FileChain(chain_file)).build(
        new_nonce(), make_measurements()
    )
    assert os.stat(chain_file).st_mode & 0o777 == 0o600
    second = EvidenceBuilder(signer, chain=FileChain(chain_file)).build(
        new_nonce(), make_measurements()
    )
    _, claims = decode(second.token)
    assert claims["bam_seq"] == 2
    assert claims["bam_prev"] == first.digest
    assert FileChain(chain_file).load() == ChainState(2, second.digest)


def test_corrupt_chain_state_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "chain.json"
    bad.write_text('{"seq": "x"}')
    with pytest.raises(EvidenceError) as e:
        FileChain(bad).load()
    assert e.value.reason == "chain_state_invalid"


@pytest.mark.parametrize("nonce", ["short", "has space in it", "é" * 10, "x" * 89])
def test_builder_refuses_a_malformed_nonce(nonce: str) -> None:
    with pytest.raises(EvidenceError) as e:
        EvidenceBuilder(SoftwareSigner.generate()).build(nonce, make_measurements())
    assert e.value.reason == "nonce_invalid"


def test_profile_constant_matches_the_claims_model() -> None:
    assert EvidenceClaims.model_fields["eat_profile"].annotation.__args__ == (EAT_PROFILE,)  # type: ignore[union-attr]
