"""Threat intelligence: STIX 2.1 bundles parsed, loaded (API and CLI) and matched against the
files every evidence measures, over real HTTP on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import stix2
from typer.testing import CliRunner

from bam.cli import app
from bam.evidence.claims import FileMeasurement, Measurements
from bam.server.client import OperatorClient
from bam.server.harness import ServerProcess
from bam.server.intel import MAX_BUNDLE_BYTES, IntelError, parse_bundle
from evidence_support import make_behavior, make_measurements
from test_server_http import Agent, _expect, admin, admin_token, backend, server

__all__ = ["admin", "admin_token", "backend", "server"]  # fixtures, shared with test_server_http

EVIL = "5" * 64
SINCE = "2020-01-01T00:00:00Z"


def _indicator(pattern: str, **kw: object) -> stix2.Indicator:
    return stix2.Indicator(pattern=pattern, pattern_type="stix", valid_from=SINCE, **kw)


def _sha(h: str) -> str:
    return f"[file:hashes.'SHA-256' = '{h}']"


def _bundle(*objects: object) -> str:
    return str(stix2.Bundle(*objects).serialize())


def test_bundle_keeps_only_what_file_hashes_decide() -> None:
    rat = stix2.Malware(name="BadRAT", is_family=True)
    named = _indicator(_sha("1" * 64))
    objects = [
        _indicator(f"{_sha('a' * 64)} OR [file:hashes.MD5 = 'cead3f77f6cda6ec00f57d76c9a6879f']"),
        named,
        rat,
        stix2.Relationship(named, "indicates", rat),
        _indicator(f"[file:hashes.'SHA-256' = '{'2' * 64}' AND file:name = 'x']"),
        _indicator(_sha("3" * 64), valid_until="2021-01-01T00:00:00Z"),
        _indicator(_sha("4" * 64), revoked=True),
        _indicator("[file:hashes.MD5 = 'cead3f77f6cda6ec00f57d76c9a6879f']"),
        _indicator(f"{_sha('6' * 64)} FOLLOWEDBY [ipv4-addr:value = '10.0.0.1']"),
        _indicator(f"{_sha('7' * 64)} WITHIN 60 SECONDS"),
    ]
    got = parse_bundle(_bundle(*objects), time.time())
    assert sorted(i.sha256 for i in got.indicators) == ["1" * 64, "a" * 64]
    assert {i.sha256: i.name for i in got.indicators}["1" * 64] == "BadRAT"
    assert got.skipped == {
        "pattern not decidable from file hashes": 3,
        "expired": 1,
        "revoked": 1,
        "no SHA-256 file hash": 1,
    }


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"{}",
        b'{"type": "bundle", "id": "bundle--1"}',  # not a STIX identifier
        _indicator(_sha("1" * 64)).serialize().encode(),  # an object, not a bundle
        b'{"type": "bundle", "id": "bundle--6f5a6c2b-7a5c-4b5e-9f0e-3b8f0b0c1d2e", "objects":'
        b' [{"type": "indicator", "spec_version": "2.1", "id": "indicator--6f5a6c2b-7a5c-4b5e-'
        b'9f0e-3b8f0b0c1d2e", "created": "2020-01-01T00:00:00Z", "modified": "2020-01-01T00:00:'
        b'00Z", "pattern": "[file:hashes.", "pattern_type": "stix", "valid_from": "2020-01-01T'
        b'00:00:00Z"}]}',  # a broken pattern
    ],
)
def test_malformed_bundles_are_refused_with_the_reason(data: bytes) -> None:
    with pytest.raises(IntelError, match="STIX"):
        parse_bundle(data, time.time())


def test_oversized_bundle_is_refused_before_parsing() -> None:
    with pytest.raises(IntelError, match="at most"):
        parse_bundle(b" " * (MAX_BUNDLE_BYTES + 1), time.time())


def _measurements(workload: str, exe_sha256: str) -> Measurements:
    ms = make_measurements(workload)
    exe = FileMeasurement(role="exe", path="/opt/app/bin/app", sha256=exe_sha256, size=4096)
    return ms.model_copy(update={"files": [exe, *ms.files[1:]]})


def test_evidence_with_a_known_malicious_file_is_contraindicated(
    server: ServerProcess, admin: OperatorClient
) -> None:
    agent = Agent(server, admin)

    def send(exe: str) -> dict[str, object]:
        token = agent.builder.build(
            agent.client.challenge(), _measurements(agent.workload, exe), make_behavior("none")
        ).token
        return agent.client.submit(token)["result"]  # type: ignore[no-any-return]

    assert send("9" * 64)["status"] == "affirming"
    rat = stix2.Malware(name="BadRAT", is_family=True)
    ind = _indicator(_sha(EVIL))
    bundle = _bundle(ind, rat, stix2.Relationship(ind, "indicates", rat))
    out = admin.put_content("/v1/intel/cti-feed", bundle)
    assert (out["hashes"], out["replaced"]) == (1, 0)
    # A broken upload is refused and changes nothing.
    _expect("intel_invalid", 422, admin.put_content, "/v1/intel/cti-feed", b"{}")
    sources = admin.get("/v1/intel")["sources"]
    assert [(s["source"], s["hashes"]) for s in sources] == [("cti-feed", 1)]

    assert send("9" * 64)["status"] == "affirming"  # other files: nothing to match
    result = send(EVIL)
    assert result["status"] == "contraindicated"
    assert result["action"] == "isolate"
    assert f"threat_intel: /opt/app/bin/app is BadRAT ({ind.id})" in result["reasons"]
    audit = [a["event"] for a in admin.get("/v1/audit", limit=50)["audit"]]
    assert "intel_loaded" in audit

    assert admin.delete("/v1/intel/cti-feed")["removed"] == 1
    _expect("intel_source_unknown", 404, admin.delete, "/v1/intel/cti-feed")
    assert admin.get("/v1/intel")["sources"] == []


def test_cli_loads_lists_and_removes_a_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BAM_DATABASE_URL", raising=False)
    monkeypatch.delenv("BAM_SERVER_DIR", raising=False)
    monkeypatch.setenv("BAM_CONFIG", str(tmp_path / "none.toml"))
    run = CliRunner().invoke
    assert run(app, ["server", "init", "--no-tls"]).exit_code == 0
    good = tmp_path / "feed.json"
    good.write_text(_bundle(_indicator(_sha(EVIL)), _indicator(_sha("e" * 64), revoked=True)))
    res = run(app, ["server", "intel", "load", str(good), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["hashes"] == 1
    assert json.loads(res.stdout)["skipped"] == {"revoked": 1}
    res = run(app, ["server", "intel", "list", "--json"])
    assert [s["source"] for s in json.loads(res.stdout)["sources"]] == ["feed"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "bundle"')
    res = run(app, ["server", "intel", "load", str(bad)])
    assert res.exit_code == 2
    assert "intel_invalid" in res.stderr
    res = run(app, ["server", "intel", "load", str(tmp_path / "missing.json")])
    assert res.exit_code == 2
    assert "intel_unreadable" in res.stderr
    assert run(app, ["server", "intel", "remove", "feed"]).exit_code == 0
    res = run(app, ["server", "intel", "remove", "feed"])
    assert res.exit_code == 2
    assert "intel_source_unknown" in res.stderr
