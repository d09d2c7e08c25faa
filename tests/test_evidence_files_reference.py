"""Measured files by reference: a token may give its file list as ``files_sha256`` alone.

The digest is always carried; it must match the list when the list is there; without the list
it stands for it, and the signature covers it like any other claim.
"""

from __future__ import annotations

import pytest

from bam.evidence import (
    EvidenceBuilder,
    SoftwareSigner,
    VerificationError,
    VerificationKey,
    new_nonce,
    verify_token,
)
from bam.evidence.claims import Measurements, files_sha256
from evidence_support import decode, make_behavior, make_measurements, resign


def test_full_token_states_the_digest_of_its_files() -> None:
    signer = SoftwareSigner.generate()
    ms = make_measurements("wl")
    token = EvidenceBuilder(signer).build(new_nonce(), ms, make_behavior()).token
    claimed = decode(token)[1]["submods"]["measurements"]
    assert claimed["files_sha256"] == files_sha256(ms.files)
    assert len(claimed["files"]) == 2
    v = verify_token(token, VerificationKey.from_signer(signer))
    assert v.claims.submods.measurements.files == ms.files
    assert not v.claims.submods.measurements.by_reference
    assert v.checks["files"] == "ok (digest matches)"


def test_token_by_reference_carries_the_digest_only() -> None:
    signer = SoftwareSigner.generate()
    builder = EvidenceBuilder(signer)
    ms = make_measurements("wl")
    full = builder.build(new_nonce(), ms, make_behavior()).token
    ref = builder.build(new_nonce(), ms, make_behavior(), files_by_reference=True).token
    assert len(ref) < len(full)
    claimed = decode(ref)[1]["submods"]["measurements"]
    assert claimed["files"] == []
    assert claimed["files_sha256"] == builder.files_digest(ms) == files_sha256(ms.files)
    vk = VerificationKey.from_signer(signer)
    prev = verify_token(full, vk)
    v = verify_token(ref, vk, previous=prev)
    assert v.claims.submods.measurements.by_reference
    assert v.checks["files"] == f"by reference: sha256 {files_sha256(ms.files)}"
    # the chain runs through both kinds alike
    assert v.claims.bam_prev == prev.digest


def test_a_digest_that_does_not_match_the_files_is_refused() -> None:
    signer = SoftwareSigner.generate()
    token = EvidenceBuilder(signer).build(new_nonce(), make_measurements(), make_behavior()).token

    def swap(claims: dict[str, object]) -> None:
        ms = claims["submods"]["measurements"]  # type: ignore[index]
        ms["files"][0]["sha256"] = "f" * 64  # type: ignore[index]  # digest left as it was

    with pytest.raises(VerificationError) as info:
        verify_token(resign(token, signer, swap), VerificationKey.from_signer(signer))
    assert info.value.reason == "claims_invalid"
    assert "files_sha256" in info.value.message


def test_digest_is_order_and_content_sensitive() -> None:
    ms = make_measurements()
    a, b = ms.files
    assert files_sha256([a, b]) != files_sha256([b, a])
    assert files_sha256([a, b]) == files_sha256([x.model_dump() for x in (a, b)])
    with pytest.raises(ValueError, match="files_sha256"):
        Measurements.model_validate(
            {**ms.model_dump(), "files_sha256": files_sha256([b, a])}, strict=False
        )


def test_no_files_means_nothing_to_refer_to() -> None:
    signer = SoftwareSigner.generate()
    ms = make_measurements().model_copy(update={"files": []})
    builder = EvidenceBuilder(signer)
    assert builder.files_digest(ms) is None
    token = builder.build(new_nonce(), ms, files_by_reference=True).token
    claimed = decode(token)[1]["submods"]["measurements"]
    assert claimed["files"] == []
    assert "files_sha256" not in claimed
    v = verify_token(token, VerificationKey.from_signer(signer))
    assert not v.claims.submods.measurements.by_reference
