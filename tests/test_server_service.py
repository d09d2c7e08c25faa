"""Service-level rules that need no HTTP: the database rate limit, TLS serving, staleness sweep."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bam.evidence import SoftwareSigner
from bam.evidence.canonical import b64url_encode
from bam.server.auth import enrol_message
from bam.server.client import AgentClient
from bam.server.errors import ServerError
from bam.server.harness import ServerProcess
from bam.server.service import A, Service
from bam.server.settings import ServerSettings
from bam.server.tls import make_certificates


def _enrolled(svc: Service, name: str) -> Any:
    token, _ = svc.create_enrol_token("test")
    signer = SoftwareSigner.generate()
    proof = b64url_encode(signer.sign(enrol_message(token, signer.thumbprint())))
    agent_id = svc.enrol(token, name, signer.public_jwk(), None, proof)["agent_id"]
    with svc.read() as conn:
        return conn.execute(A.select().where(A.c.id == agent_id)).mappings().first()


def test_agent_rate_limit_is_counted_in_the_database(tmp_path: Path) -> None:
    settings = ServerSettings(server_dir=tmp_path / "s", agent_requests_per_minute=3)
    one, two = Service(settings), Service(settings)  # two "replicas" over one database
    try:
        agent = _enrolled(one, "limited")
        one.challenge(agent)
        two.challenge(agent)
        one.challenge(agent)
        with pytest.raises(ServerError) as info:
            two.challenge(agent)
        assert (info.value.status, info.value.reason) == (429, "rate_limited")
        assert "Retry-After" in info.value.headers
        other = _enrolled(two, "unlimited")
        two.challenge(other)  # per agent, not global
    finally:
        one.close()
        two.close()


def test_sweep_marks_a_silent_workload_stale_once(tmp_path: Path) -> None:
    settings = ServerSettings(server_dir=tmp_path / "s", stale_factor=1)
    svc = Service(settings)
    try:
        agent = _enrolled(svc, "quiet")
        svc.register_workload(agent, "quiet-wl", "vm", 1.0)
        now = svc.workload("quiet-wl")
        assert now["stale"] is False
        later = time.time() + 5
        assert svc.sweep(later) == ["quiet-wl"]
        assert svc.sweep(later + 1) == []  # already stale: not marked (nor audited) twice
        wl = svc.workload("quiet-wl")
        assert (wl["stale"], wl["status"], wl["action"]) == (True, "warning", "investigate")
        assert [a["event"] for a in svc.audit_log("quiet-wl")][:2] == ["stale", "action"]
    finally:
        svc.close()


def test_tls_with_the_ca_made_by_init(tmp_path: Path) -> None:
    server_dir = tmp_path / "server"
    paths = make_certificates(server_dir / "tls", ["127.0.0.1", "localhost"])
    svc = Service(ServerSettings(server_dir=server_dir))
    token, _ = svc.create_enrol_token("test")
    svc.close()
    env = {"BAM_SERVER_DIR": str(server_dir), "BAM_LOG_LEVEL": "warning"}
    with ServerProcess(env, tls=True, log_path=tmp_path / "log") as srv:
        assert srv.url.startswith("https://")
        signer = SoftwareSigner.generate()
        with AgentClient(srv.url, signer, verify=str(paths["ca"])) as agent:
            assert agent.enrol(token, "tls-agent")["name"] == "tls-agent"
        with pytest.raises(httpx.ConnectError):  # an unpinned client refuses the self-signed CA
            httpx.get(f"{srv.url}/healthz", verify=True)
