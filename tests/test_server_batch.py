"""``POST /v1/evidence/batch`` over real HTTP, on SQLite and PostgreSQL.

A batch is one agent's tokens in chain order, each over its own nonce; each must be verified
and appraised exactly as if sent alone, stop at the first rejection, and be idempotent.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bam.evidence import EvidenceBuilder, SoftwareSigner, VerificationKey
from bam.server.client import OperatorClient
from bam.server.ear import submod, verify_ear
from bam.server.harness import ServerProcess
from evidence_support import decode, make_behavior, make_measurements, resign
from test_server_http import Agent, _expect, admin, admin_token, backend, server

__all__ = ["admin", "admin_token", "backend", "server"]  # fixtures, shared with test_server_http


def _agent(server: ServerProcess, admin: OperatorClient, workloads: int) -> tuple[Agent, list[str]]:
    agent = Agent(server, admin)
    names = [agent.workload] + [f"{agent.workload}-{i}" for i in range(1, workloads)]
    for name in names[1:]:
        agent.client.register_workload(name, "process", 300.0)
    return agent, names


def _tokens(
    agent: Agent, names: list[str], nonces: list[str], severities: list[str] | None = None
) -> list[str]:
    severities = severities or ["none"] * len(names)
    return [
        agent.builder.build(n, make_measurements(w), make_behavior(s)).token
        for n, w, s in zip(nonces, names, severities, strict=True)
    ]


def _stored(admin: OperatorClient, names: list[str]) -> list[int]:
    return sorted(
        e["seq"] for n in names for e in admin.get(f"/v1/workloads/{n}/evidence")["evidence"]
    )


def test_batch_is_each_token_appraised_in_chain_order_and_idempotent(
    server: ServerProcess, admin: OperatorClient
) -> None:
    agent, names = _agent(server, admin, 3)
    server_key = VerificationKey.from_jwk(agent.enrolment["server_jwk"])
    nonces = agent.client.challenges(3)
    assert len(set(nonces)) == 3
    items = agent.client.submit_batch(_tokens(agent, names, nonces, ["none", "critical", "none"]))
    assert [it["status"] for it in items] == [200, 200, 200]
    outs = [it["evidence"] for it in items]
    assert [o["seq"] for o in outs] == [1, 2, 3]
    assert not any(o["duplicate"] for o in outs)
    # Each token got its own appraisal and signed EAR, for its own workload.
    for out, name in zip(outs, names, strict=True):
        assert out["result"]["workload"] == name
        assert submod(verify_ear(out["result"]["ear"], server_key))[0] == name
    assert [o["result"]["status"] for o in outs] == ["affirming", "contraindicated", "affirming"]

    # The answers carry the next batch's nonces; the chain continues without a gap.
    nxt = [o["next_challenge"]["nonce"] for o in outs]
    second = _tokens(agent, names, nxt)
    again = agent.client.submit_batch(second)
    assert [it["evidence"]["seq"] for it in again] == [4, 5, 6]
    statuses = [it["evidence"]["result"]["status"] for it in again]
    # names[1] stays contraindicated (held until an ack); the others are clean, no gap.
    assert statuses == ["affirming", "contraindicated", "affirming"]
    assert not any(
        r.startswith("chain_gap") for it in again for r in it["evidence"]["result"]["reasons"]
    )

    # A retry of the whole batch (lost response): duplicates, nothing stored twice.
    retry = agent.client.submit_batch(second)
    assert all(it["status"] == 200 and it["evidence"]["duplicate"] for it in retry)
    assert [it["evidence"]["evidence_id"] for it in retry] == [
        it["evidence"]["evidence_id"] for it in again
    ]
    assert _stored(admin, names) == [1, 2, 3, 4, 5, 6]


def test_batch_may_carry_one_workload_several_times(
    server: ServerProcess, admin: OperatorClient
) -> None:
    """Later tokens see the workload state the earlier ones will write (hold included)."""
    agent, names = _agent(server, admin, 1)
    items = agent.client.submit_batch(
        _tokens(agent, names * 3, agent.client.challenges(3), ["none", "critical", "none"])
    )
    assert [it["status"] for it in items] == [200, 200, 200]
    statuses = [it["evidence"]["result"]["status"] for it in items]
    assert statuses == ["affirming", "contraindicated", "contraindicated"]
    assert any(r.startswith("held:") for r in items[2]["evidence"]["result"]["reasons"])
    actions = admin.get(f"/v1/workloads/{names[0]}/actions")["actions"]
    assert [a["action"] for a in actions] == ["isolate"]  # one action, not one per token
    assert admin.get(f"/v1/workloads/{names[0]}")["status"] == "contraindicated"


def test_batch_stops_at_the_first_rejected_token(
    server: ServerProcess, admin: OperatorClient
) -> None:
    agent, names = _agent(server, admin, 3)
    used = agent.nonce
    agent.send()  # consumes ``used``
    nonces = agent.client.challenges(3)
    tokens = _tokens(agent, names, [nonces[0], used, nonces[2]])  # token 2 replays a nonce
    items = agent.client.submit_batch(tokens)
    assert [it["status"] for it in items] == [200, 409, 424]
    assert items[1]["reason"] in ("nonce_used", "nonce_reused")
    assert items[2]["reason"] == "batch_aborted"
    assert _stored(admin, names) == [1, 2]  # agent.send() and the first token only

    # A forged token in a batch: rejected as it would be alone, nothing after it stored.
    nonces = agent.client.challenges(2)
    good, bad = _tokens(agent, names[:2], nonces)
    header, _ = decode(bad)  # the agent's kid, another key's signature
    forged = resign(bad, SoftwareSigner.generate(), header=header)
    items = agent.client.submit_batch([good, forged])
    assert [(it["status"], it.get("reason")) for it in items] == [
        (200, None),
        (401, "bad_signature"),
    ]
    assert _stored(admin, names) == [1, 2, 5]


def test_batch_request_errors(server: ServerProcess, admin: OperatorClient) -> None:
    one, names = _agent(server, admin, 1)
    two = Agent(server, admin)
    mixed = [_tokens(one, names, [one.nonce])[0], two.token()]
    _expect("batch_invalid", 422, one.client.submit_batch, mixed)
    token = one.token()
    _expect("batch_invalid", 422, one.client.submit_batch, [token, token])
    with httpx.Client(base_url=server.url) as http:
        for body, reason in (
            ({"tokens": []}, "request_invalid"),
            ({"tokens": "x" * 40}, "request_invalid"),
            ({"tokens": [1]}, "request_invalid"),
            ({"tokens": ["x" * 40], "extra": 1}, "request_invalid"),
        ):
            r = http.post("/v1/evidence/batch", json=body)
            assert (r.status_code, r.json()["reason"]) == (422, reason), body
        stranger = SoftwareSigner.generate()
        lone = EvidenceBuilder(stranger).build("n" * 43, make_measurements("x"), make_behavior())
        r = http.post("/v1/evidence/batch", json={"tokens": [lone.token]})
        assert (r.status_code, r.json()["reason"]) == (401, "unknown_agent")
    # Nothing of the refused requests was stored; the first agent's nonce is still good.
    assert _stored(admin, names) == []
    out = one.send()
    assert _stored(admin, names) == [out["seq"]]


@pytest.mark.parametrize("count", [0, 65])
def test_challenge_count_is_bounded(
    server: ServerProcess, admin: OperatorClient, count: int
) -> None:
    agent = Agent(server, admin)
    err = _expect("request_invalid", 422, agent.client.challenges, count)
    assert "count" in err.message


def test_batch_is_documented(admin: OperatorClient) -> None:
    spec: dict[str, Any] = admin.get("/openapi.json")
    assert "/v1/evidence/batch" in spec["paths"]
    assert "count" in str(spec["paths"]["/v1/challenge"])
