"""An agent whose chain no longer links (a wiped or restored spool) and the operator's reset,
over real HTTP on SQLite and PostgreSQL; and the migrated schema equals the models."""

from __future__ import annotations

import httpx
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from bam.evidence import EvidenceBuilder
from bam.server.client import OperatorClient
from bam.server.db.models import Base
from bam.server.deps import SESSION_COOKIE
from bam.server.harness import ServerProcess
from bam.server.service import Service
from evidence_support import make_behavior, make_measurements
from test_server_http import Agent, _expect, _settings, admin, admin_token, backend, server

__all__ = ["admin", "admin_token", "backend", "server"]  # fixtures, shared with test_server_http


def test_diverged_chain_is_refused_until_an_operator_resets_it(
    server: ServerProcess, admin: OperatorClient, admin_token: str
) -> None:
    agent = Agent(server, admin)
    agent.send()
    agent.send()
    # The same key with its chain state lost: it starts again at bam_seq 1.
    lost = EvidenceBuilder(agent.signer)

    def again() -> str:
        nonce = agent.client.challenge()
        return lost.build(nonce, make_measurements(agent.workload), make_behavior("none")).token

    _expect("seq_replay", 409, agent.client.submit, again())
    # Remembered on the agent (only an operator can end it) and shown on the dashboard.
    listed = {a["name"]: a for a in admin.get("/v1/agents")["agents"]}[agent.name]
    assert listed["refused_reason"] == "seq_replay"
    assert listed["refused_at"] is not None
    fleet = httpx.get(
        f"{server.url}/dashboard/fleet.frag", cookies={SESSION_COOKIE: admin_token}, timeout=30
    )
    assert fleet.status_code == 200
    assert "agent blocked: seq_replay" in fleet.text
    # The same from a batch.
    lost = EvidenceBuilder(agent.signer)
    tokens = [
        lost.build(n, make_measurements(agent.workload), make_behavior("none")).token
        for n in agent.client.challenges(2)
    ]
    items = agent.client.submit_batch(tokens)
    assert [it.get("reason") for it in items] == ["seq_replay", "batch_aborted"]
    lost = EvidenceBuilder(agent.signer)
    _expect("agent_unknown", 404, admin.post, "/v1/agents/no-such-agent/reset-chain", {})
    out = admin.post(f"/v1/agents/{agent.name}/reset-chain", {"note": "disk replaced"})
    assert out["name"] == agent.name
    assert out["previous_seq"] == 2
    listed = {a["name"]: a for a in admin.get("/v1/agents")["agents"]}[agent.name]
    assert (listed["chain_epoch"], listed["last_seq"]) == (1, 0)
    audit = admin.get("/v1/audit", limit=20)["audit"]
    assert any(a["event"] == "agent_chain_reset" for a in audit)
    lost = EvidenceBuilder(agent.signer)  # the refused token advanced its chain: start again
    first = agent.client.submit(again())
    assert first["seq"] == 1
    assert first["result"]["status"] == "warning"
    assert any(r.startswith("chain_reset") for r in first["result"]["reasons"])
    listed = {a["name"]: a for a in admin.get("/v1/agents")["agents"]}[agent.name]
    assert listed["refused_reason"] is None  # cleared by the accepted token
    second = agent.client.submit(again())
    assert second["seq"] == 2
    stored = admin.get(f"/v1/workloads/{agent.workload}/evidence")["evidence"]
    assert sorted((e["chain_epoch"], e["seq"]) for e in stored) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert not any(r.startswith("chain_reset") for r in second["result"]["reasons"])
    # The old chain's next token is refused now: the new chain is the one the server follows.
    old = agent.token(nonce=agent.client.challenge())  # bam_seq 3, linked to the old seq 2
    _expect("chain_broken", 422, agent.client.submit, old)


def test_migrated_schema_matches_the_models(backend: dict[str, str]) -> None:
    svc = Service(_settings(backend))  # migrates to the newest revision
    try:
        with svc.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        svc.close()
    assert diff == []
