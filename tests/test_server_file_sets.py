"""Tokens that give their measured files by reference, over real HTTP, on SQLite and PostgreSQL.

The server stores a file list once (by its digest) when a token carrying it in full verifies;
a later token may give only the digest, and is appraised against the stored list exactly as if
it had carried it. A digest the server does not hold is refused (``measurements_unknown``)
with nothing stored, so that the agent can sign the token again in full.
"""

from __future__ import annotations

import uuid

from bam.evidence.claims import FileMeasurement, Measurements, files_sha256
from bam.evidence.token import ChainState
from bam.server.client import OperatorClient
from bam.server.harness import ServerProcess
from bam.server.service import Service
from evidence_support import decode, make_behavior, make_measurements
from test_server_http import Agent, _expect, _settings, admin, admin_token, backend, server

__all__ = ["admin", "admin_token", "backend", "server"]  # fixtures, shared with test_server_http


def _unique(workload: str) -> Measurements:
    """Measurements with a file list no other test sends (the store is content-addressed)."""
    ms = make_measurements(workload)
    extra = FileMeasurement(
        role="config", path=f"/etc/{uuid.uuid4().hex}.conf", sha256="d" * 64, size=7
    )
    return ms.model_copy(update={"files": [*ms.files, extra]})


def _evidence(admin: OperatorClient, workload: str) -> list[dict[str, object]]:
    return list(admin.get(f"/v1/workloads/{workload}/evidence")["evidence"])


def test_reference_resolves_to_the_stored_list_and_is_appraised_against_it(
    server: ServerProcess, admin: OperatorClient, backend: dict[str, str]
) -> None:
    agent = Agent(server, admin)
    ms = _unique(agent.workload)
    admin.put(
        f"/v1/workloads/{agent.workload}/reference", {"files": {f.path: f.sha256 for f in ms.files}}
    )

    # Before any token carried the list: refused, nothing stored, the nonce still usable.
    ref = agent.builder.build(agent.nonce, ms, make_behavior(), files_by_reference=True).token
    err = _expect("measurements_unknown", 409, agent.client.submit, ref)
    assert files_sha256(ms.files) in err.message
    assert _evidence(admin, agent.workload) == []
    agent.builder.chain.save(ChainState())  # the agent signs that token again (rolled back)

    full = agent.builder.build(agent.nonce, ms, make_behavior()).token
    out = agent.client.submit(full)
    assert out["result"]["status"] == "affirming"
    ref = agent.builder.build(
        out["next_challenge"]["nonce"], ms, make_behavior(), files_by_reference=True
    ).token
    out = agent.client.submit(ref)
    assert out["seq"] == 2
    assert out["result"]["status"] == "affirming"
    assert not any(r.startswith("chain_gap") for r in out["result"]["reasons"])
    assert len(ref) < len(full)

    # The stored list is what policy sees: a reference value that no longer matches one of
    # its files makes the next token by reference contraindicated, naming the file.
    changed = {f.path: f.sha256 for f in ms.files} | {"/usr/sbin/nginx": "e" * 64}
    admin.put(f"/v1/workloads/{agent.workload}/reference", {"files": changed})
    nonce = out["next_challenge"]["nonce"]
    ref = agent.builder.build(nonce, ms, make_behavior(), files_by_reference=True).token
    out = agent.client.submit(ref)
    assert out["result"]["status"] == "contraindicated"
    assert "measurement_mismatch: /usr/sbin/nginx" in out["result"]["reasons"]

    # Another server process over the same database (a replica, or this one restarted)
    # resolves it from the database: nothing of it lives only in a process.
    replica = Service(_settings(backend))
    try:
        ack = admin.post(f"/v1/workloads/{agent.workload}/ack", {"note": "test"})
        assert ack["name"] == agent.workload
        admin.put(
            f"/v1/workloads/{agent.workload}/reference",
            {"files": {f.path: f.sha256 for f in ms.files}},
        )
        nonce = out["next_challenge"]["nonce"]
        ref = agent.builder.build(nonce, ms, make_behavior(), files_by_reference=True).token
        res = replica.submit_evidence(ref)
        assert res.seq == 4
        assert res.result["status"] == "affirming"
    finally:
        replica.close()
    stored = _evidence(admin, agent.workload)
    assert sorted(int(e["seq"]) for e in stored) == [1, 2, 3, 4]  # type: ignore[call-overload]


def test_batch_may_send_a_list_in_full_then_refer_to_it(
    server: ServerProcess, admin: OperatorClient
) -> None:
    agent = Agent(server, admin)
    ms = _unique(agent.workload)
    n1, n2 = agent.client.challenges(2)
    tokens = [
        agent.builder.build(n1, ms, make_behavior()).token,
        agent.builder.build(n2, ms, make_behavior(), files_by_reference=True).token,
    ]
    assert decode(tokens[1])[1]["submods"]["measurements"]["files"] == []
    items = agent.client.submit_batch(tokens)
    assert [it["status"] for it in items] == [200, 200]
    assert [it["evidence"]["seq"] for it in items] == [1, 2]

    # A reference the server cannot resolve stops the batch there (nothing after it stored).
    other = _unique(agent.workload)
    nxt = [it["evidence"]["next_challenge"]["nonce"] for it in items]
    refused = agent.client.submit_batch(
        [
            agent.builder.build(nxt[0], other, make_behavior(), files_by_reference=True).token,
            agent.builder.build(nxt[1], ms, make_behavior(), files_by_reference=True).token,
        ]
    )
    assert [(it["status"], it["reason"]) for it in refused] == [
        (409, "measurements_unknown"),
        (424, "batch_aborted"),
    ]
    assert len(_evidence(admin, agent.workload)) == 2
