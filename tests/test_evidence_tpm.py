"""TPM quotes on a real TPM 2.0 emulator (swtpm, started here): produced through BAM,
verified by BAM and independently by ``tpm2_checkquote``; attacks on the quote fail for their
own reasons; handles are flushed; a rolled-back TPM (resetCount going back) is caught."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bam.cli import app
from bam.evidence import (
    EvidenceBuilder,
    MemoryChain,
    SoftwareSigner,
    VerificationError,
    VerificationKey,
    new_nonce,
    verify_token,
)
from bam.evidence.quote import export_checkquote_files
from bam.evidence.swtpm import Swtpm
from bam.evidence.tpm import TpmDevice
from conftest import require, require_tool
from evidence_support import FakeTpm, b64d, b64e, decode, make_behavior, make_measurements, resign

PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 16, 23)


def _need_tpm_stack() -> None:
    require_tool("swtpm")
    require(importlib.util.find_spec("tpm2_pytss") is not None, "Python package tpm2-pytss")


@pytest.fixture(scope="module")
def swtpm() -> Iterator[Swtpm]:
    _need_tpm_stack()
    with Swtpm() as emulator:
        with TpmDevice(emulator.tcti) as dev:
            dev.extend_pcr(16, b"bam test measurement")
        yield emulator


@pytest.fixture
def device(swtpm: Swtpm) -> Iterator[TpmDevice]:
    with TpmDevice(swtpm.tcti) as dev:
        yield dev


def _reason(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(VerificationError) as e:
        fn(*args, **kw)
    return e.value.reason


class TpmAgent:
    def __init__(self, device: Any, signer: Any = None) -> None:
        self.signer = signer or SoftwareSigner.generate()
        self.vk = VerificationKey.from_signer(self.signer)
        self.builder = EvidenceBuilder(self.signer, tpm=device, pcrs=PCRS)
        self.ak = VerificationKey.from_jwk(device.ak_jwk()).kid

    def token(self, nonce: str | None = None) -> tuple[str, str]:
        nonce = nonce or new_nonce()
        ev = self.builder.build(nonce, make_measurements(), make_behavior())
        return ev.token, nonce

    def verify(self, token: str, **kw: Any) -> Any:
        kw.setdefault("trusted_aks", [self.ak])
        return verify_token(token, self.vk, **kw)


def _tools_env(swtpm: Swtpm) -> dict[str, str]:
    return {**os.environ, "TPM2TOOLS_TCTI": swtpm.tcti}


def test_quote_made_through_bam_verifies_with_tpm2_checkquote(swtpm: Swtpm, tmp_path: Path) -> None:
    checkquote = require_tool("tpm2_checkquote")
    pcrread = require_tool("tpm2_pcrread")
    with TpmDevice(swtpm.tcti) as dev:  # closed before the tools connect (one client at a time)
        agent = TpmAgent(dev)
        token, nonce = agent.token()
    v = agent.verify(token, nonce=nonce)
    assert v.checks["tpm_quote"] == "ok"
    assert v.checks["tpm_ak"] == "ok (enrolled)"

    files = export_checkquote_files(token, tmp_path / "q")
    qualifying = files["qualifying"].read_text().strip()
    cmd = [checkquote, "-u", files["ak"], "-m", files["attest"], "-s", files["signature"]]
    cmd += ["-f", files["pcrs"], "-g", "sha256"]
    ok = subprocess.run([*cmd, "-q", qualifying], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    # The tool really checks the binding: other qualifying data is refused.
    bad = subprocess.run([*cmd, "-q", "00" * 32], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0

    # The PCR values in the token are the TPM's, read independently by tpm2-tools.
    out = tmp_path / "pcr16.bin"
    subprocess.run(
        [pcrread, "sha256:16", "-o", out], env=_tools_env(swtpm), check=True, timeout=30,
        capture_output=True,
    )  # fmt: skip
    assert decode(token)[1]["submods"]["tpm"]["pcrs"]["16"] == out.read_bytes().hex()
    assert out.read_bytes() != bytes(32)


def test_tpm_signed_token_verifies_with_independent_jose_library(device: TpmDevice) -> None:
    from joserfc import jws
    from joserfc.jwk import ECKey

    from bam.evidence.keys.tpm import TpmSigner

    signer = TpmSigner(device)
    agent = TpmAgent(device, signer=signer)
    token, nonce = agent.token()
    obj = jws.deserialize_compact(
        token, ECKey.import_key(signer.public_jwk()), algorithms=["ES256"]
    )
    assert obj.headers()["alg"] == "ES256"
    assert json.loads(obj.payload)["eat_nonce"] == nonce
    v = agent.verify(token, nonce=nonce)
    assert v.kid == signer.thumbprint()
    # The TPM's signing key and attestation key are distinct keys.
    assert signer.thumbprint() != agent.ak


def test_keys_are_stable_across_connections(swtpm: Swtpm) -> None:
    with TpmDevice(swtpm.tcti) as a:
        ak, sk = a.ak_jwk(), a.signing_jwk()
    with TpmDevice(swtpm.tcti) as b:
        assert (b.ak_jwk(), b.signing_jwk()) == (ak, sk)


def test_handles_are_flushed(swtpm: Swtpm) -> None:
    # Without a resource manager, a 4th leaked object fails with TPM_RC_OBJECT_MEMORY.
    for _ in range(6):
        with TpmDevice(swtpm.tcti) as dev:
            dev.quote(b"\1" * 32, (0,))
            dev.sign_digest(b"\2" * 32)
    getcap = shutil.which("tpm2_getcap")
    if getcap is not None:
        out = subprocess.run(
            [getcap, "handles-transient"], env=_tools_env(swtpm), capture_output=True,
            text=True, timeout=30, check=True,
        )  # fmt: skip
        assert out.stdout.strip() == ""


# -- attacks on the quote -----------------------------------------------------------------


def test_quote_over_other_data(device: TpmDevice) -> None:
    agent = TpmAgent(device)
    token, nonce = agent.token()

    def calmer(c: dict[str, Any]) -> None:
        c["submods"]["behavior"]["severity"] = "none"
        c["submods"]["behavior"]["scores"]["hmm"] = 0.0

    # The agent's key signs the edited claims, but the TPM quoted the original ones.
    assert _reason(agent.verify, resign(token, agent.signer, calmer), nonce=nonce) == (
        "tpm_qualifying_data"
    )
    other_nonce = new_nonce()
    moved = resign(token, agent.signer, lambda c: c.update(eat_nonce=other_nonce))
    assert _reason(agent.verify, moved, nonce=other_nonce) == "tpm_qualifying_data"


def test_pcr_values_not_matching_the_quote_digest(device: TpmDevice) -> None:
    agent = TpmAgent(device)
    token, nonce = agent.token()
    forged = resign(
        token, agent.signer, lambda c: c["submods"]["tpm"]["pcrs"].update({"16": "00" * 32})
    )
    assert _reason(agent.verify, forged, nonce=nonce) == "tpm_pcr_digest"


def test_pcr_list_not_matching_the_quote_selection(device: TpmDevice) -> None:
    agent = TpmAgent(device)
    token, nonce = agent.token()
    fewer = resign(token, agent.signer, lambda c: c["submods"]["tpm"]["pcrs"].pop("23"))
    assert _reason(agent.verify, fewer, nonce=nonce) == "tpm_pcr_selection"


def test_altered_attest_breaks_the_quote_signature(device: TpmDevice) -> None:
    agent = TpmAgent(device)
    token, nonce = agent.token()
    tpm = decode(token)[1]["submods"]["tpm"]
    attest = bytearray(b64d(tpm["attest"]))
    attest[-50] ^= 1  # inside firmwareVersion: still parses
    forged = resign(token, agent.signer, lambda c: c["submods"]["tpm"].update(attest=b64e(attest)))
    assert _reason(agent.verify, forged, nonce=nonce) == "tpm_quote_signature"


def test_copied_counters_must_match_the_signed_ones(device: TpmDevice) -> None:
    agent = TpmAgent(device)
    token, nonce = agent.token()
    forged = resign(token, agent.signer, lambda c: c["submods"]["tpm"].update(reset_count=0))
    assert _reason(agent.verify, forged, nonce=nonce) == "tpm_clock_mismatch"


def test_quote_by_an_unenrolled_key(device: TpmDevice) -> None:
    agent = TpmAgent(device)
    fake = FakeTpm()  # software "TPM": a perfect quote, by a key no TPM holds
    impostor = EvidenceBuilder(agent.signer, tpm=fake, pcrs=PCRS)
    nonce = new_nonce()
    token = impostor.build(nonce, make_measurements()).token
    assert _reason(agent.verify, token, nonce=nonce) == "tpm_ak_untrusted"
    # Unpinned, the quote is internally consistent: accepted, but flagged.
    v = verify_token(token, agent.vk, nonce=nonce)
    assert "tpm_ak_not_pinned" in v.notes


def test_reference_pcr_values(device: TpmDevice) -> None:
    agent = TpmAgent(device)
    token, nonce = agent.token()
    pcr16 = decode(token)[1]["submods"]["tpm"]["pcrs"]["16"]
    v = agent.verify(token, nonce=nonce, expected_pcrs={16: pcr16, 0: "00" * 32})
    assert v.checks["tpm_pcr_values"] == "ok"
    assert _reason(agent.verify, token, nonce=nonce, expected_pcrs={16: "00" * 32}) == (
        "tpm_pcr_value"
    )


def test_dropping_the_quote_after_a_quoted_token(device: TpmDevice) -> None:
    agent = TpmAgent(device)
    first, n1 = agent.token()
    prev = agent.verify(first, nonce=n1)
    second, n2 = agent.token()
    stripped = resign(second, agent.signer, lambda c: c["submods"].pop("tpm"))
    assert _reason(agent.verify, stripped, nonce=n2, previous=prev) == "tpm_missing"
    assert agent.verify(second, nonce=n2, previous=prev).checks["tpm_monotonic"] == "ok"


def test_reset_count_going_back_is_caught(tmp_path: Path) -> None:
    """A TPM reboot (resetCount up) is noted; a rolled-back TPM state (resetCount down) fails."""
    _need_tpm_stack()
    state, snapshot = tmp_path / "state", tmp_path / "snapshot"
    signer = SoftwareSigner.generate()
    vk = VerificationKey.from_signer(signer)
    chain = MemoryChain()

    def token_now(emulator: Swtpm) -> tuple[str, str, str]:
        with TpmDevice(emulator.tcti) as dev:
            b = EvidenceBuilder(signer, chain=chain, tpm=dev, pcrs=(0, 16))
            nonce = new_nonce()
            ak = VerificationKey.from_jwk(dev.ak_jwk()).kid
            return b.build(nonce, make_measurements()).token, nonce, ak

    emulator = Swtpm(state)
    try:
        emulator.start()
        with TpmDevice(emulator.tcti) as dev:  # a first use: the TPM's state is on disk
            first_ak = VerificationKey.from_jwk(dev.ak_jwk()).kid
        emulator.stop()
        assert any(state.iterdir())
        shutil.copytree(state, snapshot)  # an old copy of the TPM's state (e.g. a vTPM file)
        emulator.start()
        emulator.restart()
        t1, n1, ak = token_now(emulator)
        assert ak == first_ak
        v1 = verify_token(t1, vk, nonce=n1, trusted_aks=[ak])

        emulator.restart()  # a legitimate reboot
        t2, n2, _ = token_now(emulator)
        v2 = verify_token(t2, vk, nonce=n2, previous=v1, trusted_aks=[ak])
        assert v2.tpm_clock is not None
        assert v1.tpm_clock is not None
        assert v2.tpm_clock.reset_count == v1.tpm_clock.reset_count + 1
        assert "tpm_reset_since_previous" in v2.notes

        emulator.stop()
        shutil.rmtree(state)
        shutil.copytree(snapshot, state)  # roll the TPM back
        emulator.start()
        t3, n3, ak3 = token_now(emulator)
        assert ak3 == ak  # same TPM identity: only its counters went back
        reason = _reason(verify_token, t3, vk, nonce=n3, previous=v2, trusted_aks=[ak])
        assert reason == "tpm_reset_back"
    finally:
        emulator.close()


def test_cli_create_and_verify_with_tpm_key_and_quote(
    swtpm: Swtpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAM_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    shown = runner.invoke(app, ["key", "show", "--tcti", swtpm.tcti, "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    (tmp_path / "sign.jwk").write_text(json.dumps(info["jwk"]))
    (tmp_path / "ak.pem").write_text(info["ak"]["pem"])
    token_file = tmp_path / "t.jwt"
    made = runner.invoke(
        app,
        ["report", "create", "--nonce", "cli-nonce-0001", "--tcti", swtpm.tcti, "--tpm-key",
         "--pcrs", "0-7,16", "--out", str(token_file)],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    ok = runner.invoke(
        app,
        ["report", "verify", str(token_file), "--key", str(tmp_path / "sign.jwk"),
         "--ak", str(tmp_path / "ak.pem"), "--nonce", "cli-nonce-0001", "--require-tpm",
         "--json"],
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    result = json.loads(ok.stdout)
    assert result["ok"] is True
    assert result["header"]["alg"] == "ES256"
    assert result["checks"]["tpm_quote"] == "ok"
    assert sorted(result["claims"]["submods"]["tpm"]["pcrs"], key=int) == [
        *map(str, range(8)),
        "16",
    ]
