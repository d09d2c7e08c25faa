"""The agent delivers several waiting observations as one batch, against a real server.

* three waiting observations go in one ``POST /v1/evidence/batch`` (a lone one still goes to
  ``POST /v1/evidence``, over the nonce the batch's answers carried);
* a crash with a batch in flight, before the server stored it (its nonces expire meanwhile)
  and after it stored all or part of it: after a restart everything is delivered exactly
  once, with no gap in the server's chain;
* a token refused in the middle of a batch: the ones before it are delivered, a refusal for
  good drops its observation, a refused nonce has it signed again, and the ones after it are
  signed again and delivered.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bam.agent.config import AgentSettings
from bam.agent.runner import Agent
from bam.evidence.claims import Measurements
from bam.server.client import OperatorClient
from bam.server.harness import ServerProcess
from bam.server.service import Service
from bam.server.settings import ServerSettings
from evidence_support import make_behavior, make_measurements


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("agent-batch")
    return {
        "BAM_SERVER_DIR": str(root / "server"),
        "BAM_DATA_DIR": str(root / "data"),
        "BAM_LOG_LEVEL": "warning",
        "BAM_POLICY_REFRESH_S": "0",
        "BAM_NONCE_TTL_S": "4",  # short, so tokens stranded by a crash expire in the test
    }


@pytest.fixture(scope="module")
def admin_token(env: dict[str, str]) -> str:
    svc = Service(ServerSettings(server_dir=Path(env["BAM_SERVER_DIR"])))
    try:
        return svc.create_operator_token("admin", "admin", "test")
    finally:
        svc.close()


@pytest.fixture(scope="module")
def server(
    env: dict[str, str], admin_token: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("agent-batch-log") / "server.log"
    with ServerProcess(env, log_path=log) as srv:
        yield srv


def _settings(srv: ServerProcess, admin: str, tmp_path: Path, name: str) -> AgentSettings:
    with OperatorClient(srv.url, admin) as op:
        token = str(op.post("/v1/admin/enrol-tokens", {"note": name})["token"])
    return AgentSettings(
        server_url=srv.url,
        enrol_token=token,
        name=name,
        data_dir=tmp_path / "agent",
        tls_verify=False,
    )


def _agent(settings: AgentSettings, workloads: list[str]) -> Agent:
    agent = Agent(settings)
    agent.enrol()
    for wl in workloads:
        agent.client.register_workload(wl, "process", 30)
    return agent


def _payload(workload: str) -> dict[str, Any]:
    return {
        "behavior": make_behavior("none").model_dump(mode="json", exclude_none=True),
        "measurements": make_measurements(workload).model_dump(mode="json", exclude_none=True),
    }


class _Calls:
    """Counts the agent's requests (they still go to the real server)."""

    def __init__(self, agent: Agent) -> None:
        self.singles = 0
        self.batches: list[int] = []
        self.challenges = 0
        self.tokens: list[str] = []
        client = agent.client
        submit, submit_batch = client.submit, client.submit_batch
        challenge, challenges = client.challenge, client.challenges

        def one(token: str) -> dict[str, Any]:
            self.singles += 1
            self.tokens.append(token)
            return submit(token)

        def many(tokens: list[str]) -> list[dict[str, Any]]:
            self.batches.append(len(tokens))
            self.tokens.extend(tokens)
            return submit_batch(tokens)

        def nonce() -> str:
            self.challenges += 1
            return challenge()

        def nonces(count: int) -> list[str]:
            self.challenges += 1
            return challenges(count)

        client.submit, client.submit_batch = one, many  # type: ignore[method-assign]
        client.challenge, client.challenges = nonce, nonces  # type: ignore[method-assign]


def _chain(srv: ServerProcess, admin: str, workloads: list[str]) -> list[tuple[int, str]]:
    """``(seq, workload)`` of everything the server stored for ``workloads``, by seq; asserts
    that the server reported no chain gap."""
    rows: list[tuple[int, str]] = []
    with OperatorClient(srv.url, admin) as op:
        for wl in workloads:
            ev = op.get(f"/v1/workloads/{wl}/evidence", limit=1000)["evidence"]
            rows.extend((int(r["seq"]), wl) for r in ev)
            results = op.get(f"/v1/workloads/{wl}/results", limit=1000)["results"]
            gaps = [r for r in results if any("chain_gap" in x for x in r["reasons"])]
            assert not gaps, f"the server saw chain gaps: {gaps}"
    return sorted(rows)


def _nonce_of(token: str) -> str:
    body = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return str(claims["eat_nonce"])


def _fates(out: list[Any]) -> list[tuple[int, bool, bool]]:
    return [(d.seq, d.ok, d.duplicate) for d in out]


def test_waiting_observations_go_in_one_batch(
    server: ServerProcess, admin_token: str, tmp_path: Path
) -> None:
    wls = ["wl-b1", "wl-b2", "wl-b3"]
    agent = _agent(_settings(server, admin_token, tmp_path, "agent-batch"), wls)
    calls = _Calls(agent)
    for wl in wls:  # one observation per target, as an agent with 3 targets makes them
        agent.spool.push(wl, "none", _payload(wl))
    out = agent.delivery.pump()
    assert _fates(out) == [(1, True, False), (2, True, False), (3, True, False)]
    assert [d.workload for d in out] == wls
    assert all(d.status for d in out)
    assert calls.batches == [3]
    assert calls.singles == 0
    assert calls.challenges == 1  # POST /v1/challenge?count=3
    assert agent.spool.pending_count() == 0
    assert agent.spool.inflight_all() == []
    assert len(agent.delivery.nonces) == 3  # each stored token's answer carried one
    # a lone observation takes the single-token path, over a nonce the batch's answers carried
    agent.spool.push("wl-b2", "none", _payload("wl-b2"))
    out = agent.delivery.pump()
    assert _fates(out) == [(4, True, False)]
    assert calls.singles == 1
    assert calls.challenges == 1
    agent.close()
    assert _chain(server, admin_token, wls) == [
        (1, "wl-b1"),
        (2, "wl-b2"),
        (3, "wl-b3"),
        (4, "wl-b2"),
    ]


def test_batch_max_setting_bounds_each_request(
    server: ServerProcess, admin_token: str, tmp_path: Path
) -> None:
    wls = ["wl-m1", "wl-m2"]
    settings = _settings(server, admin_token, tmp_path, "agent-batch-max")
    agent = _agent(settings.model_copy(update={"batch_max": 2}), wls)
    assert agent.delivery.batch_max == 2
    calls = _Calls(agent)
    for i in range(5):
        agent.spool.push(wls[i % 2], "none", _payload(wls[i % 2]))
    out = agent.delivery.pump()
    assert [d.seq for d in out if d.ok] == [1, 2, 3, 4, 5]
    assert calls.batches == [2, 2]
    assert calls.singles == 1  # the fifth, alone
    agent.close()
    assert [seq for seq, _ in _chain(server, admin_token, wls)] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="batch_max"):
        AgentSettings(batch_max=0)


def test_unsignable_observation_is_dropped_not_blocking(
    server: ServerProcess, admin_token: str, tmp_path: Path
) -> None:
    """A payload the claim models refuse (e.g. written by another version) is dropped, counted
    and reported; the observations behind it are still delivered."""
    wls = ["wl-u1", "wl-u2"]
    agent = _agent(_settings(server, admin_token, tmp_path, "agent-unsignable"), wls)
    calls = _Calls(agent)
    agent.spool.push(wls[0], "none", {"measurements": {"bogus": 1}, "behavior": None})
    agent.spool.push(wls[0], "none", _payload(wls[0]))
    agent.spool.push(wls[1], "none", _payload(wls[1]))
    out = agent.delivery.pump()
    assert [(d.seq, d.workload, d.ok) for d in out] == [(1, wls[0], True), (2, wls[1], True)]
    assert agent.spool.pending_count() == 0
    assert agent.spool.get_meta("dropped") == "1"
    first = calls.tokens[0].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(first + "=" * (-len(first) % 4)))
    assert "spool_dropped=1" in claims["submods"]["behavior"]["top_features"]
    agent.close()
    assert [seq for seq, _ in _chain(server, admin_token, wls)] == [1, 2]


def test_crash_with_a_batch_in_flight_delivers_each_once(
    server: ServerProcess, admin_token: str, tmp_path: Path
) -> None:
    wl = "wl-bcrash"
    settings = _settings(server, admin_token, tmp_path, "agent-bcrash")
    agent = _agent(settings, [wl])

    def stage_three() -> list[str]:
        """What the delivery does up to the crash point: sign 3, commit them in flight."""
        for _ in range(3):
            agent.spool.push(wl, "none", _payload(wl))
        assert agent.delivery._sign(3) == 3
        return [r.token for r in agent.spool.inflight_all()]

    # crash 1: committed in flight, never sent; their nonces expire while the agent is "down"
    assert len(stage_three()) == 3
    agent.close()
    agent = Agent(settings)
    assert [r.seq for r in agent.spool.inflight_all()] == [1, 2, 3]
    time.sleep(4.5)
    calls = _Calls(agent)
    out = agent.delivery.pump()
    assert _fates(out) == [(1, True, False), (2, True, False), (3, True, False)]
    assert calls.batches == [3, 3]  # sent verbatim (nonce_expired), then signed again
    # crash 2: the server stored the first two of the batch, the agent never learnt it
    tokens = stage_three()
    stored = agent.client.submit_batch(tokens[:2])
    assert [x["status"] for x in stored] == [200, 200]
    agent.close()
    agent = Agent(settings)
    calls = _Calls(agent)
    out = agent.delivery.pump()
    assert _fates(out) == [(4, True, True), (5, True, True), (6, True, False)]
    assert calls.batches == [3]
    assert calls.tokens == tokens  # resent verbatim
    # crash 3: the server stored the whole batch
    tokens = stage_three()
    agent.client.submit_batch(tokens)
    agent.close()
    agent = Agent(settings)
    out = agent.delivery.pump()
    assert _fates(out) == [(7, True, True), (8, True, True), (9, True, True)]
    assert agent.spool.pending_count() == 0
    assert agent.spool.inflight_all() == []
    agent.close()
    assert [seq for seq, _ in _chain(server, admin_token, [wl])] == list(range(1, 10))


def test_token_refused_mid_batch(
    server: ServerProcess, admin_token: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bam.agent")
    wl = "wl-bmid"
    agent = _agent(_settings(server, admin_token, tmp_path, "agent-bmid"), [wl])
    calls = _Calls(agent)
    # refused for good (a workload the server does not know): dropped, the rest signed again
    agent.spool.push(wl, "none", _payload(wl))
    agent.spool.push("wl-unregistered", "none", _payload("wl-unregistered"))
    agent.spool.push(wl, "none", _payload(wl))
    agent.spool.push(wl, "none", _payload(wl))
    out = agent.delivery.pump()
    assert _fates(out) == [(1, True, False), (2, False, False), (2, True, False), (3, True, False)]
    assert out[1].workload == "wl-unregistered"
    assert out[1].error is not None
    assert "workload_unknown" in out[1].error
    assert calls.batches == [4, 2]
    assert agent.spool.pending_count() == 0
    # a replayed nonce (one a stored token already used) in the middle: signed again
    used = _nonce_of(calls.tokens[0])
    for _ in range(3):
        agent.spool.push(wl, "none", _payload(wl))
    fresh = agent.client.challenge()
    agent.delivery.nonces = [(fresh, time.time() + 60), (used, time.time() + 60)]
    out = agent.delivery.pump()
    assert _fates(out) == [(4, True, False), (5, True, False), (6, True, False)]
    assert calls.batches == [4, 2, 3, 2]
    assert "seq 5..6 not accepted (nonce_used)" in caplog.text
    # the previous token's nonce again (``nonce_reused``): signed again too
    for _ in range(2):
        agent.spool.push(wl, "none", _payload(wl))
    fresh = agent.client.challenge()
    agent.delivery.nonces = [(fresh, time.time() + 60), (fresh, time.time() + 60)]
    out = agent.delivery.pump()
    assert _fates(out) == [(7, True, False), (8, True, False)]
    assert calls.batches == [4, 2, 3, 2, 2]
    assert "seq 8..8 not accepted (nonce_reused)" in caplog.text
    assert calls.singles == 1  # the one left after the refusal went alone
    assert agent.spool.pending_count() == 0
    agent.close()
    # the refused token never reached the chain: its seq was reused, no gap anywhere
    assert [seq for seq, _ in _chain(server, admin_token, [wl])] == list(range(1, 9))


def test_lost_spool_blocks_delivery_until_the_chain_is_reset(
    server: ServerProcess, admin_token: str, tmp_path: Path
) -> None:
    settings = _settings(server, admin_token, tmp_path, "agent-lost-spool")
    agent = _agent(settings, ["wl-lost"])
    for _ in range(2):
        agent.spool.push("wl-lost", "none", _payload("wl-lost"))
    assert _fates(agent.delivery.pump()) == [(1, True, False), (2, True, False)]
    agent.close()
    for f in settings.data_dir.glob("spool.db*"):  # the disk is replaced; the key survives
        f.unlink()
    agent = Agent(settings)
    for _ in range(3):
        agent.spool.push("wl-lost", "none", _payload("wl-lost"))
    assert agent.delivery.pump() == []
    blocked = agent.delivery.blocked
    assert blocked is not None
    assert "seq_replay" in blocked
    assert "reset-chain" in blocked
    assert agent.stats()["blocked"] == blocked
    assert agent.spool.get_meta("blocked") == blocked  # for `bam agent status`
    assert agent.spool.pending_count() == 3  # nothing dropped: all kept for after the reset
    assert agent.delivery.pump() == []  # and not hammering: the next try is a minute away
    with OperatorClient(server.url, admin_token) as op:
        reset = op.post("/v1/agents/agent-lost-spool/reset-chain", {"note": "disk replaced"})
    assert (reset["previous_seq"], reset["epoch"]) == (2, 1)
    agent.delivery.retry_at = 0.0  # the minute has passed
    out = agent.delivery.pump()
    assert _fates(out) == [(1, True, False), (2, True, False), (3, True, False)]
    assert agent.delivery.blocked is None
    assert not agent.spool.get_meta("blocked")
    assert out[0].status == "warning"
    assert any(r.startswith("chain_reset") for r in out[0].reasons)
    assert not any(r.startswith("chain_reset") for r in out[1].reasons)
    agent.close()


def test_revoked_agent_keeps_its_observations_and_does_not_raise(
    server: ServerProcess, admin_token: str, tmp_path: Path
) -> None:
    agent = _agent(_settings(server, admin_token, tmp_path, "agent-revoked"), ["wl-rev"])
    svc = Service(ServerSettings(server_dir=Path(server.env["BAM_SERVER_DIR"])))
    try:
        svc.revoke_agent("agent-revoked", "test")
    finally:
        svc.close()
    agent.spool.push("wl-rev", "none", _payload("wl-rev"))
    assert agent.delivery.pump() == []  # the challenge is refused (403): no exception
    assert agent.delivery.blocked is not None
    assert "agent_revoked" in agent.delivery.blocked
    assert agent.spool.pending_count() == 1
    assert not agent.delivery.server_up
    agent.close()


def _files_of(token: str) -> list[Any]:
    body = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return list(claims["submods"]["measurements"]["files"])


def test_files_go_by_reference_once_stored_and_in_full_when_the_server_lacks_them(
    server: ServerProcess, admin_token: str, tmp_path: Path
) -> None:
    wls = ["wl-f1", "wl-f2"]
    agent = _agent(_settings(server, admin_token, tmp_path, "agent-files"), wls)
    calls = _Calls(agent)
    unique = {"role": "config", "path": f"/etc/bam-test-{time.time_ns()}", "sha256": "d" * 64}
    payloads = []
    for wl in wls:
        p = _payload(wl)
        p["measurements"]["files"].append({**unique, "size": 1})
        payloads.append(p)
    # Both observations carry the same new list: the first token in full, the second
    # (signed in the same batch, before the server acknowledged the first) also in full.
    for wl, p in zip(wls, payloads, strict=True):
        agent.spool.push(wl, "none", p)
    assert [d.ok for d in agent.delivery.pump()] == [True, True]
    assert [len(_files_of(t)) for t in calls.tokens] == [3, 3]
    # Acknowledged: from now on the list goes by its digest.
    for wl, p in zip(wls, payloads, strict=True):
        agent.spool.push(wl, "none", p)
    assert [d.ok for d in agent.delivery.pump()] == [True, True]
    assert [len(_files_of(t)) for t in calls.tokens[2:]] == [0, 0]

    # An agent that believes the server holds a list it does not (a restored server database):
    # refused as measurements_unknown, signed again in full, delivered, no chain gap.
    other = _payload(wls[0])
    other["measurements"]["files"].append({**unique, "path": unique["path"] + ".2", "size": 2})
    ms = Measurements.model_validate(other["measurements"])
    digest = agent.builder.files_digest(ms)
    assert digest is not None
    agent.delivery.server_files.add(digest)
    agent.spool.push(wls[0], "none", other)
    out = agent.delivery.pump()
    assert [(d.seq, d.ok) for d in out] == [(5, True)]
    assert [len(_files_of(t)) for t in calls.tokens[4:]] == [0, 3]  # refused, then in full
    assert digest in agent.delivery.server_files  # acknowledged this time
    agent.close()
    assert [seq for seq, _ in _chain(server, admin_token, wls)] == [1, 2, 3, 4, 5]
