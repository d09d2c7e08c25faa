"""``bam report verify`` / ``create``, ``bam key show`` and ``bam bench evidence``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bam.cli import app
from conftest import REQUIRE_ALL


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BAM_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _create(home: Path, name: str, nonce: str) -> Path:
    out = home / name
    code, stdout, stderr = _run("report", "create", "--nonce", nonce, "--out", str(out))
    assert code == 0, stdout + stderr
    return out


def test_verify_prints_claims_and_ok(home: Path) -> None:
    token = _create(home, "t1.jwt", "nonce-0000-0001")
    code, out, err = _run("report", "verify", str(token), "--nonce", "nonce-0000-0001")
    assert code == 0, out + err
    assert '"eat_nonce": "nonce-0000-0001"' in out
    assert '"bam_seq": 1' in out
    assert out.rstrip().splitlines()[-1].startswith("OK seq 1")


def test_tampered_token_prints_the_reason_and_fails(home: Path) -> None:
    token = _create(home, "t1.jwt", "nonce-0000-0001")
    h, p, s = token.read_text().strip().split(".")
    tampered = home / "tampered.jwt"
    tampered.write_text(f"{h}.{p[:-4]}AAAA.{s}\n")
    code, out, err = _run("report", "verify", str(tampered))
    assert code == 1
    assert "FAILED" in err
    assert "bad_signature" in err or "malformed" in err
    assert "OK" not in out

    code, out, _ = _run("report", "verify", str(token), "--nonce", "another-nonce-1", "--json")
    assert code == 1
    assert json.loads(out) == {
        "ok": False,
        "reason": "nonce_mismatch",
        "message": "eat_nonce is not the nonce this verifier issued",
    }


def test_verify_json_and_chain_with_prev(home: Path) -> None:
    first = _create(home, "t1.jwt", "nonce-0000-0001")
    second = _create(home, "t2.jwt", "nonce-0000-0002")
    code, out, err = _run(
        "report", "verify", str(second), "--prev", str(first), "--nonce", "nonce-0000-0002",
        "--json",
    )  # fmt: skip
    assert code == 0, out + err
    result = json.loads(out)
    assert result["ok"] is True
    assert result["checks"]["chain"] == "ok"
    assert result["claims"]["bam_seq"] == 2
    # Wrong order: the "previous" token is the later one.
    code, out, _ = _run("report", "verify", str(first), "--prev", str(second), "--json")
    assert code == 1
    assert json.loads(out)["reason"] == "nonce_reused" or json.loads(out)["reason"] == "seq_replay"
    bogus = home / "bogus.jwt"
    bogus.write_text("not.a.token")
    code, out, _ = _run("report", "verify", str(second), "--prev", str(bogus), "--json")
    assert code == 1
    assert json.loads(out)["reason"] == "previous_invalid"


def test_verify_with_an_explicit_public_key(home: Path) -> None:
    token = _create(home, "t1.jwt", "nonce-0000-0001")
    code, pem, _ = _run("key", "show", "--pem")
    assert code == 0
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    (home / "agent.pem").write_text(pem)
    code, out, _ = _run("report", "verify", str(token), "--key", str(home / "agent.pem"))
    assert "OK seq 1" in out
    assert code == 0
    # Another agent's key: refused, naming the key that did sign.
    code, info, _ = _run("key", "show", "--json")
    kid = json.loads(info)["kid"]
    shutil.rmtree(home / "data")
    _run("key", "show")  # a new local key
    code, _out, err = _run("report", "verify", str(token))
    assert code == 1
    assert "unknown_key" in err
    assert kid in err


def test_bad_input_is_a_one_line_error(home: Path) -> None:
    code, _, err = _run("report", "verify", str(home / "missing.jwt"))
    assert code == 2
    assert "token_unreadable" in err
    (home / "t.jwt").write_text("a.b.c")
    code, _, err = _run("report", "verify", str(home / "t.jwt"))
    assert code == 2
    assert "key_missing" in err
    (home / "k.pem").write_text("garbage")
    code, _, err = _run("report", "verify", str(home / "t.jwt"), "--key", str(home / "k.pem"))
    assert code == 2
    assert "key_invalid" in err
    assert "Traceback" not in err


def test_create_measures_a_process_and_models(home: Path) -> None:
    import os

    model = home / "baseline.json"
    model.write_text("{}")
    behavior = home / "behavior.json"
    behavior.write_text(
        json.dumps(
            {
                "window_start": 1.0,
                "window_end": 2.0,
                "baseline_id": "b1",
                "scores": {"ngram": 0.1},
                "thresholds": {"ngram": 0.5},
                "severity": "low",
                "counts": {"new_processes": 1, "new_listening_ports": 0, "exec_mappings": 0},
                "raw_log_sha256": "0" * 64,
            }
        )
    )
    code, out, err = _run(
        "report", "create", "--pid", str(os.getpid()), "--model", f"m1={model}",
        "--behavior", str(behavior), "--nonce", "nonce-0000-0009", "--json",
    )  # fmt: skip
    assert code == 0, out + err
    claims = json.loads(out)["claims"]
    assert claims["submods"]["measurements"]["target"]["kind"] == "process"
    assert claims["submods"]["measurements"]["models"][0]["model_id"] == "m1"
    assert claims["submods"]["behavior"]["severity"] == "low"


def test_bench_evidence_json(home: Path) -> None:
    code, out, err = _run("bench", "evidence", "--json", "--n", "300", "--quotes", "20")
    assert code == 0, out + err
    result = json.loads(out)
    for key in ("sign_ms_median", "verify_ms_median", "tokens_per_s", "tpm_quotes_per_s"):
        assert key in result
    assert result["tokens_per_s"] > 0
    # Speed targets are measured by `bam bench evidence`, not asserted in tests (noisy cores).
    assert result["sign_ms_median"] > 0
    assert result["verify_ms_median"] > 0
    if result["tpm_quotes_per_s"] is None:
        assert not REQUIRE_ALL, result["tpm_error"]
    else:
        assert result["tpm_quotes_per_s"] > 1
