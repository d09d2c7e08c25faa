"""Quote parsing and verification in pure Python (no TPM: a software stand-in signs), TPM
counter monotonicity, and Hypothesis fuzzing of the token and quote parsers: whatever the
input, they raise nothing but BAM's own VerificationError."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from typing import Any

import pytest
import rfc8785
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bam.evidence import (
    EvidenceBuilder,
    SoftwareSigner,
    VerificationError,
    VerificationKey,
    new_nonce,
    verify_token,
)
from bam.evidence.keys import public_key_from_jwk
from bam.evidence.quote import (
    checkquote_pcr_file,
    parse_attest,
    parse_signature,
    qualifying_data,
    verify_quote,
)
from bam.evidence.token import sign_compact
from evidence_support import (
    FakeTpm,
    b64d,
    b64e,
    make_behavior,
    make_measurements,
    marshal_attest,
    resign,
)

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_JSON = settings(FUZZ, max_examples=120)  # structured JSON inputs are slower to generate


class Agent:
    def __init__(self) -> None:
        self.signer = SoftwareSigner.generate()
        self.vk = VerificationKey.from_signer(self.signer)
        self.tpm = FakeTpm()
        self.builder = EvidenceBuilder(self.signer, tpm=self.tpm, pcrs=(0, 1, 2))

    def token(self) -> tuple[str, str]:
        nonce = new_nonce()
        return self.builder.build(nonce, make_measurements(), make_behavior()).token, nonce

    def verify(self, token: str, **kw: Any) -> Any:
        return verify_token(token, self.vk, **kw)


def _outcome(fn: Any, data: bytes) -> str:
    try:
        fn(data)
    except VerificationError as e:
        return e.reason
    return "ok"


def _reason(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(VerificationError) as e:
        fn(*args, **kw)
    return e.value.reason


def test_binding_covers_nonce_and_every_other_claim() -> None:
    agent = Agent()
    token, nonce = agent.token()
    v = agent.verify(token, nonce=nonce)
    attest = parse_attest(b64d(v.payload["submods"]["tpm"]["attest"]))
    without = dict(v.payload)
    without["submods"] = {k: x for k, x in v.payload["submods"].items() if k != "tpm"}
    body = hashlib.sha256(rfc8785.dumps(without))
    assert attest.extra_data == hashlib.sha256(nonce.encode() + body.digest()).digest()
    assert attest.extra_data == qualifying_data(nonce, without)


@pytest.mark.parametrize(
    ("change", "reason", "note"),
    [
        ({"reset": 0}, "tpm_reset_back", None),
        ({"restart": -1}, "tpm_restart_back", None),
        ({"clock": -5000}, "tpm_clock_back", None),
        ({"reset": 1, "clock": -5000, "safe": 0}, None, "tpm_reset_since_previous"),
        ({"reset": 1, "clock": -5000}, "tpm_clock_back", None),  # safe=YES: cannot go back
        ({"reset": 1, "clock": 5000}, None, "tpm_reset_since_previous"),
        ({"restart": 1}, None, "tpm_restart_since_previous"),
        ({}, None, None),
    ],
)
def test_tpm_counters_against_the_previous_token(
    change: dict[str, int], reason: str | None, note: str | None
) -> None:
    agent = Agent()
    agent.tpm.reset, agent.tpm.restart, agent.tpm.clock = 5, 3, 100_000
    first, n1 = agent.token()
    prev = agent.verify(first, nonce=n1)
    if "reset" in change:
        agent.tpm.reset = 5 - 1 if change["reset"] == 0 else 5 + change["reset"]
    agent.tpm.restart += change.get("restart", 0)
    agent.tpm.clock += change.get("clock", 0)
    agent.tpm.safe = bool(change.get("safe", 1))
    second, n2 = agent.token()
    if reason is not None:
        assert _reason(agent.verify, second, nonce=n2, previous=prev) == reason
    else:
        v = agent.verify(second, nonce=n2, previous=prev)
        assert v.checks["tpm_monotonic"] == "ok"
        assert (note in v.notes) if note else not v.notes or v.notes == ("tpm_ak_not_pinned",)


def test_ak_may_not_change_between_tokens() -> None:
    agent = Agent()
    first, n1 = agent.token()
    prev = agent.verify(first, nonce=n1)
    agent.builder = EvidenceBuilder(agent.signer, chain=agent.builder.chain, tpm=FakeTpm())
    second, n2 = agent.token()
    assert _reason(agent.verify, second, nonce=n2, previous=prev) == "tpm_ak_untrusted"


def test_quote_checks_in_isolation() -> None:
    tpm = FakeTpm()
    ak = public_key_from_jwk(tpm.ak_jwk())
    q = tpm.quote(b"\7" * 32, (0, 1, 2))
    kw: dict[str, Any] = {"pcr_bank": "sha256", "pcrs": q.pcrs}
    verify_quote(q.attest, q.signature, ak, expected_extra_data=b"\7" * 32, **kw)  # type: ignore[arg-type]
    with pytest.raises(VerificationError) as e:
        verify_quote(q.attest, q.signature, ak, expected_extra_data=b"\0" * 32, **kw)  # type: ignore[arg-type]
    assert e.value.reason == "tpm_qualifying_data"
    other = FakeTpm()
    with pytest.raises(VerificationError) as e:
        verify_quote(
            q.attest,
            q.signature,
            public_key_from_jwk(other.ak_jwk()),  # type: ignore[arg-type]
            expected_extra_data=b"\7" * 32,
            **kw,
        )
    assert e.value.reason == "tpm_quote_signature"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"magic": 0xFF544348}, "magic"),
        ({"st": 0x8014}, "not a quote"),
        ({"bank": 0x0099}, "unknown PCR bank"),
    ],
)
def test_attest_that_is_not_a_tpm_quote(kw: dict[str, int], message: str) -> None:
    data = marshal_attest(b"x", b"\0" * 32, [0], **kw)
    with pytest.raises(VerificationError, match=message) as e:
        parse_attest(data)
    assert e.value.reason == "tpm_attest_malformed"


def test_attest_truncated_or_with_trailing_bytes() -> None:
    data = marshal_attest(b"x", b"\0" * 32, [0])
    parse_attest(data)
    for bad in (data[:-1], data + b"\0", data[:10], b""):
        assert _reason(parse_attest, bad) == "tpm_attest_malformed"


def test_signature_formats() -> None:
    tpm = FakeTpm()
    q = tpm.quote(b"x", (0,))
    sig = parse_signature(q.signature)
    assert sig.hash_alg == "sha256"
    rsassa = struct.pack(">HHH", 0x0014, 0x000B, 2) + b"\0\0"
    assert _reason(parse_signature, rsassa) == "tpm_signature_malformed"
    sha1 = bytearray(q.signature)
    sha1[2:4] = b"\x00\x04"
    assert _reason(parse_signature, bytes(sha1)) == "tpm_signature_malformed"
    assert _reason(parse_signature, q.signature + b"\0") == "tpm_signature_malformed"


def test_checkquote_pcr_file_layout() -> None:
    pcrs = {i: bytes([i]) * 32 for i in (0, 1, 2, 3, 4, 5, 6, 7, 16, 23)}
    data = checkquote_pcr_file("sha256", pcrs)
    assert len(data) == 132 + 4 + 2 * 532
    assert data[:4] == b"\1\0\0\0"
    assert data[4:11] == b"\x0b\x00\x03\xff\x00\x81\x00"
    assert struct.unpack_from("<I", data, 132)[0] == 2
    assert struct.unpack_from("<IH", data, 136) == (8, 32)


# -- fuzzing ---------------------------------------------------------------------------------

_AGENT = Agent()
_TOKEN, _NONCE = _AGENT.token()
_Q = _AGENT.tpm.quote(b"\5" * 32, (0, 1, 2))
_AK = public_key_from_jwk(_AGENT.tpm.ak_jwk())


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_attest_parser(data: bytes) -> None:
    assert _outcome(parse_attest, data) in ("ok", "tpm_attest_malformed")


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_signature_parser(data: bytes) -> None:
    assert _outcome(parse_signature, data) in ("ok", "tpm_signature_malformed")


@FUZZ
@given(st.data())
def test_fuzz_mutated_quote(data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["attest", "signature"]))
    blob = bytearray(_Q.attest if which == "attest" else _Q.signature)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del blob[pos : pos + data.draw(st.integers(1, 8))]
        else:
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    assume(bytes(blob) != (_Q.attest if which == "attest" else _Q.signature))
    attest = bytes(blob) if which == "attest" else _Q.attest
    signature = bytes(blob) if which == "signature" else _Q.signature
    with pytest.raises(VerificationError):
        verify_quote(
            attest, signature, _AK, expected_extra_data=b"\5" * 32, pcr_bank="sha256", pcrs=_Q.pcrs
        )  # type: ignore[arg-type]


@FUZZ
@given(st.text(max_size=400) | st.binary(max_size=400))
def test_fuzz_token_text(text: str | bytes) -> None:
    with pytest.raises(VerificationError):
        verify_token(text, _AGENT.vk)


@FUZZ
@given(st.data())
def test_fuzz_any_change_to_a_valid_token_fails(data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(_TOKEN) - 1))
    ch = data.draw(st.characters(codec="ascii").filter(lambda c: c != _TOKEN[pos]))
    mutated = _TOKEN[:pos] + ch + _TOKEN[pos + 1 :]
    with pytest.raises(VerificationError):
        verify_token(mutated, _AGENT.vk, nonce=_NONCE)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=10,
)


def _valid_claims() -> dict[str, Any]:
    return json.loads(b64d(_TOKEN.split(".")[1]))


@FUZZ_JSON
@given(st.dictionaries(st.text(max_size=12), _json, max_size=6))
def test_fuzz_signed_arbitrary_claims(claims: dict[str, Any]) -> None:
    token = sign_compact(
        {"alg": "EdDSA", "typ": "eat+jwt", "kid": _AGENT.vk.kid}, claims, _AGENT.signer
    )
    with pytest.raises(VerificationError):
        verify_token(token, _AGENT.vk)


@FUZZ
@given(
    st.binary(max_size=300)
    | st.sampled_from([b'{"iat": Infinity}', b'{"a": NaN}', b"[]", b'"x"', b"{" * 5000, b"\xff"])
)
def test_fuzz_signed_arbitrary_payload_bytes(payload: bytes) -> None:
    header = b64e(json.dumps({"alg": "EdDSA", "typ": "eat+jwt", "kid": _AGENT.vk.kid}).encode())
    signing_input = f"{header}.{b64e(payload)}"
    token = f"{signing_input}.{b64e(_AGENT.signer.sign(signing_input.encode()))}"
    with pytest.raises(VerificationError):
        verify_token(token, _AGENT.vk)


@FUZZ_JSON
@given(st.data())
def test_fuzz_signed_mutations_of_valid_claims(data: st.DataObject) -> None:
    claims = _valid_claims()
    path: list[Any] = []
    node: Any = claims
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(
            st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node)))
        )
        path.append(key)
        node = node[key]
    replacement = data.draw(_json)
    if not path:
        return
    parent: Any = claims
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = replacement
    token = resign(_TOKEN, _AGENT.signer, lambda c: (c.clear(), c.update(claims)))
    with contextlib.suppress(VerificationError):  # anything else fails the test
        verify_token(token, _AGENT.vk, nonce=_NONCE)


@FUZZ_JSON
@given(st.dictionaries(st.text(max_size=8), _json, max_size=5))
def test_fuzz_signed_arbitrary_headers(header: dict[str, Any]) -> None:
    token = sign_compact(header, _valid_claims(), _AGENT.signer)
    h = b64e(json.dumps(header).encode())
    for candidate in (token, f"{h}.{_TOKEN.split('.', 1)[1]}"):
        with pytest.raises(VerificationError):
            verify_token(candidate, _AGENT.vk, nonce=_NONCE)
