"""Key store (Ed25519, 0600, never logged), JWK / thumbprints, canonical JSON and base64url."""

from __future__ import annotations

import json
import logging
import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bam.evidence import KeyStoreError, SoftwareKeyStore, VerificationError, VerificationKey
from bam.evidence.canonical import b64url_decode, b64url_encode, jcs, strict_json_object
from bam.evidence.keys import default_data_dir, jwk_thumbprint, public_key_from_jwk


def test_key_created_on_first_use_with_private_permissions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SoftwareKeyStore(tmp_path / "data")
    assert not store.exists()
    with caplog.at_level(logging.DEBUG):
        signer = store.load_or_create()
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    assert [p.name for p in store.directory.iterdir()] == ["agent-ed25519.pem"]
    again = SoftwareKeyStore(tmp_path / "data").load_or_create()
    assert again.thumbprint() == signer.thumbprint()
    # What was logged names the file and the public thumbprint, never the key.
    secret_pem = store.path.read_text()
    body = "".join(secret_pem.splitlines()[1:-1])
    logged = caplog.text
    assert signer.thumbprint() in logged
    assert body not in logged
    assert body not in repr(signer)
    assert "d" not in signer.public_jwk()


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    store = SoftwareKeyStore(tmp_path)
    store.load_or_create()
    os.chmod(store.path, 0o640)
    with pytest.raises(KeyStoreError) as e:
        store.load()
    assert e.value.reason == "key_permissions"
    assert "BEGIN" not in str(e.value)


def test_damaged_key_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    store = SoftwareKeyStore(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    fd = os.open(store.path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n-----END PRIVATE KEY-----\n")
    os.close(fd)
    with pytest.raises(KeyStoreError) as e:
        store.load()
    assert e.value.reason == "key_invalid"
    assert "SECRET" not in str(e.value)


def test_symlinked_key_is_refused(tmp_path: Path) -> None:
    real = SoftwareKeyStore(tmp_path / "real")
    real.load_or_create()
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "agent-ed25519.pem").symlink_to(real.path)
    with pytest.raises(KeyStoreError) as e:
        SoftwareKeyStore(tmp_path / "link").load()
    assert e.value.reason == "key_unreadable"


def test_signer_cannot_be_pickled(tmp_path: Path) -> None:
    signer = SoftwareKeyStore(tmp_path).load_or_create()
    with pytest.raises(TypeError):
        pickle.dumps(signer)


def test_missing_key(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError) as e:
        SoftwareKeyStore(tmp_path).load()
    assert e.value.reason == "key_missing"


def test_default_data_dir_follows_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAM_DATA_DIR", str(tmp_path / "x"))
    assert default_data_dir() == tmp_path / "x"
    monkeypatch.delenv("BAM_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "bam"


def test_public_key_from_pem_and_jwk_agree(tmp_path: Path) -> None:
    signer = SoftwareKeyStore(tmp_path).load_or_create()
    vk = VerificationKey.from_signer(signer)
    from_pem = VerificationKey.from_text(vk.pem())
    from_jwk = VerificationKey.from_text(json.dumps(vk.jwk))
    from_show = VerificationKey.from_text(json.dumps({"jwk": vk.jwk, "kid": vk.kid}))
    assert from_pem.kid == from_jwk.kid == from_show.kid == signer.thumbprint()
    assert from_pem.alg == "EdDSA"


def test_private_keys_are_refused_where_public_keys_are_expected() -> None:
    priv = Ed25519PrivateKey.generate()
    pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(KeyStoreError):
        VerificationKey.from_text(pem)
    with pytest.raises(KeyStoreError):
        public_key_from_jwk({"kty": "OKP", "crv": "Ed25519", "x": "A" * 43, "d": "B" * 43})


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": "c2VjcmV0"},
        {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
        {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url_encode(b"\1" * 32),
            "y": b64url_encode(b"\2" * 32),
        },
        {"kty": "OKP", "crv": "Ed25519", "x": "short"},
        {"kty": "OKP", "crv": "X25519", "x": b64url_encode(b"\1" * 32)},
    ],
)
def test_unsupported_or_invalid_jwks_are_refused(jwk: dict[str, str]) -> None:
    with pytest.raises(KeyStoreError):
        VerificationKey.from_jwk(jwk)


def test_es256_key_roundtrip() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    vk = VerificationKey.from_public_key(key)
    assert vk.alg == "ES256"
    assert VerificationKey.from_jwk(vk.jwk).kid == vk.kid


def test_rfc8037_thumbprint_example() -> None:
    # RFC 8037 Appendix A.3.
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_jcs_rfc8785_example() -> None:
    # RFC 8785 §3.2.3 (input) and §3.2.4 (canonical output).
    value = json.loads(
        '{"numbers":[333333333.33333329,1E30,4.50,2e-3,0.000000000000000000000000001],'
        '"string":"\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        '"literals":[null,true,false]}'
    )
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert jcs(value) == expected.encode()


def test_jcs_refuses_what_is_not_i_json() -> None:
    for bad in (2**60, float("nan"), {"\ud800": 1}, {1: 2}):
        with pytest.raises(ValueError, match="canonicalisable"):
            jcs(bad)


def test_strict_base64url() -> None:
    for n in range(0, 70):
        data = os.urandom(n)
        assert b64url_decode(b64url_encode(data)) == data
    for bad in ("a", "ab=", "a+b/", "ab c", "AB", "AR", "A===", "é"):
        with pytest.raises(VerificationError):
            b64url_decode(bad)


def test_strict_json() -> None:
    assert strict_json_object(b'{"a":1}', "x") == {"a": 1}
    for bad in (b'{"a":1,"a":2}', b"[1]", b'{"a":NaN}', b"\xff", b"{" * 100_000):
        with pytest.raises(VerificationError) as e:
            strict_json_object(bad, "x")
        assert e.value.reason == "malformed"


def test_verification_key_checks_signatures_with_its_one_algorithm() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    msg = b"header.payload"
    ed = Ed25519PrivateKey.generate()
    ed_vk = VerificationKey.from_public_key(ed.public_key())
    sig = ed.sign(msg)
    assert ed_vk.verify(msg, sig)
    assert not ed_vk.verify(msg + b"x", sig)
    assert not ed_vk.verify(msg, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not ed_vk.verify(msg, sig[:63])  # wrong length: refused, not an exception
    assert not ed_vk.verify(msg, b"")
    other = VerificationKey.from_public_key(Ed25519PrivateKey.generate().public_key())
    assert not other.verify(msg, sig)

    p256 = ec.generate_private_key(ec.SECP256R1())
    es_vk = VerificationKey.from_public_key(p256.public_key())
    r, s = decode_dss_signature(p256.sign(msg, ec.ECDSA(hashes.SHA256())))
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert es_vk.verify(msg, raw)
    assert not es_vk.verify(msg + b"x", raw)
    assert not es_vk.verify(msg, raw[:32])
    # a signature of one algorithm never verifies under a key of the other
    assert not es_vk.verify(msg, sig)
    assert not ed_vk.verify(msg, raw)
