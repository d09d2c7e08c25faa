"""The attestation server over real HTTP on loopback, on SQLite and on PostgreSQL.

Each backend gets a real ``bam server run`` process (started and stopped by the fixtures) and,
for PostgreSQL, a throwaway cluster made with initdb/pg_ctl as the postgres user. Every test
enrols its own agent and workload, so tests do not depend on each other's state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bam.evidence import EvidenceBuilder, SoftwareSigner, VerificationKey
from bam.evidence.canonical import b64url_encode
from bam.server.auth import SIGNATURE_HEADER, sign_request
from bam.server.client import AgentClient, ApiError, OperatorClient
from bam.server.ear import submod, verify_ear
from bam.server.harness import ServerProcess
from bam.server.pgtemp import PostgresUnavailableError, TempPostgres, pg_bindir
from bam.server.policy import default_source
from bam.server.service import Service
from bam.server.settings import ServerSettings
from conftest import require
from evidence_support import decode, make_behavior, make_measurements, resign

NONCE_TTL_S = 2.0


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Settings (environment) of a fresh database: embedded SQLite or a throwaway cluster."""
    root = tmp_path_factory.mktemp(f"server-{request.param}")
    env = {"BAM_SERVER_DIR": str(root / "server"), "BAM_DATA_DIR": str(root / "data")}
    if request.param == "sqlite":
        yield env
        return
    require(pg_bindir() is not None, "PostgreSQL server binaries (initdb, pg_ctl)")
    try:
        pg = TempPostgres().start()  # under /tmp: the postgres user must reach it
    except PostgresUnavailableError as e:
        require(False, f"a throwaway PostgreSQL cluster: {e}")
        raise
    try:
        yield {**env, "BAM_DATABASE_URL": pg.url}
    finally:
        pg.stop()


def _settings(env: dict[str, str]) -> ServerSettings:
    return ServerSettings(
        server_dir=Path(env["BAM_SERVER_DIR"]), database_url=env.get("BAM_DATABASE_URL")
    )


@pytest.fixture(scope="module")
def admin_token(backend: dict[str, str]) -> str:
    svc = Service(_settings(backend))
    try:
        return svc.create_operator_token("admin", "admin", "test")
    finally:
        svc.close()


@pytest.fixture(scope="module")
def server(
    backend: dict[str, str], admin_token: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        **backend,
        "BAM_NONCE_TTL_S": str(NONCE_TTL_S),
        "BAM_STALE_CHECK_S": "0.3",
        "BAM_STALE_FACTOR": "1",
        "BAM_MAX_BODY_BYTES": str(64 * 1024),
        "BAM_POLICY_REFRESH_S": "0",
        "BAM_LOG_LEVEL": "warning",
    }
    log = tmp_path_factory.mktemp("log") / "server.log"
    with ServerProcess(env, log_path=log) as srv:
        yield srv


@pytest.fixture
def admin(server: ServerProcess, admin_token: str) -> Iterator[OperatorClient]:
    with OperatorClient(server.url, admin_token) as client:
        yield client


_counter = iter(range(1_000_000))


class Agent:
    """A simulated agent: its own key, chain, workload and current nonce."""

    def __init__(
        self, server: ServerProcess, admin: OperatorClient, interval_s: float = 300.0
    ) -> None:
        n = next(_counter)
        self.name = f"agent-{n}-{time.monotonic_ns() % 100000}"
        self.workload = f"wl-{self.name}"
        self.signer = SoftwareSigner.generate()
        self.client = AgentClient(server.url, self.signer)
        token = admin.post("/v1/admin/enrol-tokens", {"note": self.name})["token"]
        self.enrolment = self.client.enrol(token, self.name)
        self.client.register_workload(self.workload, "process", interval_s)
        self.builder = EvidenceBuilder(self.signer)
        self.nonce = self.client.challenge()

    def token(self, severity: str = "none", nonce: str | None = None) -> str:
        return self.builder.build(
            nonce or self.nonce, make_measurements(self.workload), make_behavior(severity)
        ).token

    def send(self, severity: str = "none") -> dict[str, Any]:
        out = self.client.submit(self.token(severity))
        self.nonce = out["next_challenge"]["nonce"]
        return out


def _expect(reason: str, status: int, fn: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert (info.value.status, info.value.reason) == (status, reason), info.value
    assert "Traceback" not in info.value.message
    return info.value


def test_enrol_challenge_evidence_result_action_ack(
    server: ServerProcess, admin: OperatorClient
) -> None:
    agent = Agent(server, admin)
    server_key = VerificationKey.from_jwk(agent.enrolment["server_jwk"])
    assert agent.enrolment["server_kid"] == server_key.kid

    first = agent.send()
    result = first["result"]
    assert (first["seq"], first["duplicate"]) == (1, False)
    assert (result["status"], result["action"], result["policy_id"]) == (
        "affirming",
        "allow",
        "bam-default@v1",
    )
    claims = verify_ear(result["ear"], server_key)
    name, sub = submod(claims)
    assert name == agent.workload
    assert sub["ear.status"] == "affirming"
    assert sub["ear.trustworthiness-vector"]["executables"] == 2  # behaviour → executables
    assert sub["bam_action"] == {"action": "allow", "reasons": []}
    assert sub["bam_evidence"]["seq"] == 1
    assert "eat_nonce" in claims  # bound to the evidence it appraises

    gate = admin.get(f"/v1/access/{agent.workload}")
    assert (gate["allow"], gate["status"], gate["fresh"]) == (True, "affirming", True)
    admin.put(f"/v1/workloads/{agent.workload}/secrets/disk", {"value": "s3cret-disk-key"})
    assert agent.client.release_secret(agent.workload, "disk") == "s3cret-disk-key"

    bad = agent.send("critical")["result"]
    assert (bad["status"], bad["action"]) == ("contraindicated", "isolate")
    assert "behavior_severity_critical" in bad["reasons"]
    assert (
        submod(verify_ear(bad["ear"], server_key))[1]["ear.trustworthiness-vector"]["executables"]
        == 33
    )

    actions = agent.client.actions(after=0, wait=5)
    assert [a["action"] for a in actions] == ["isolate"]
    agent.client.report(actions[0]["id"], "done", "cgroup frozen")

    # Contraindicated sticks: healthy evidence does not clear it until an operator acks.
    held = agent.send()["result"]
    assert held["status"] == "contraindicated"
    assert any(r.startswith("held:") for r in held["reasons"])
    assert admin.get(f"/v1/access/{agent.workload}")["allow"] is False
    _expect("not_trusted", 403, agent.client.release_secret, agent.workload, "disk")

    acked = admin.post(f"/v1/workloads/{agent.workload}/ack", {"note": "investigated: test"})
    assert acked["hold"] is False
    back = agent.send()["result"]
    assert (back["status"], back["action"]) == ("affirming", "allow")
    assert admin.get(f"/v1/access/{agent.workload}")["allow"] is True

    events = [a["event"] for a in admin.get("/v1/audit", workload=agent.workload)["audit"]]
    for event in (
        "workload_registered",
        "action",
        "action_done",
        "ack",
        "secret_released",
        "secret_denied",
    ):
        assert event in events, events
    acts = admin.get(f"/v1/workloads/{agent.workload}/actions")["actions"]
    assert [a["action"] for a in reversed(acts)] == ["isolate", "allow"]
    assert acts[-1]["state"] == "done"
    results = admin.get(f"/v1/workloads/{agent.workload}/results")["results"]
    assert [r["status"] for r in reversed(results)] == [
        "affirming",
        "contraindicated",
        "contraindicated",
        "affirming",
    ]
    assert all(r["policy_version"] == 1 for r in results)


def test_retry_is_idempotent_and_replayed_nonce_rejected(
    server: ServerProcess, admin: OperatorClient
) -> None:
    agent = Agent(server, admin)
    nonce = agent.nonce
    token = agent.token()
    first = agent.client.submit(token)
    again = agent.client.submit(token)  # a retry of the same token (lost response)
    assert again["duplicate"] is True
    assert again["next_challenge"] is None
    assert (again["evidence_id"], again["result"]["id"]) == (
        first["evidence_id"],
        first["result"]["id"],
    )

    replay = agent.token(nonce=nonce)  # a new token under the used nonce
    err = _expect("nonce_reused", 409, agent.client.submit, replay)
    assert "nonce" in err.message
    evidence = admin.get(f"/v1/workloads/{agent.workload}/evidence")["evidence"]
    assert [e["seq"] for e in evidence] == [1]


def test_unknown_agent(server: ServerProcess, admin: OperatorClient) -> None:
    stranger = SoftwareSigner.generate()
    token = EvidenceBuilder(stranger).build("n" * 43, make_measurements("x"), make_behavior()).token
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/evidence", json={"token": token})
    assert r.status_code == 401
    assert r.json()["reason"] == "unknown_agent"
    _expect("unknown_agent", 401, AgentClient(server.url, stranger).challenge)


def test_wrong_key(server: ServerProcess, admin: OperatorClient) -> None:
    agent = Agent(server, admin)
    other = SoftwareSigner.generate()
    good = agent.token()
    header, _ = decode(good)  # the enrolled agent's kid, but signed by another key
    forged = resign(good, other, header=header)
    _expect("bad_signature", 401, agent.client.submit, forged)
    # A signed request with the agent's kid and another key's signature.
    path = "/v1/challenge"
    sig = sign_request(other, "POST", path, b"", int(time.time())).replace(
        other.thumbprint(), agent.signer.thumbprint()
    )
    with httpx.Client(base_url=server.url) as http:
        r = http.post(path, headers={SIGNATURE_HEADER: sig})
    assert (r.status_code, r.json()["reason"]) == (401, "bad_signature")
    # The genuine token still goes through afterwards: nothing was consumed by the forgery.
    assert agent.client.submit(good)["result"]["status"] == "affirming"


def test_expired_nonce(server: ServerProcess, admin: OperatorClient) -> None:
    agent = Agent(server, admin)
    time.sleep(NONCE_TTL_S + 0.5)
    _expect("nonce_expired", 422, agent.client.submit, agent.token())
    agent.nonce = agent.client.challenge()
    # The rejected token advanced only the agent's own chain: the server accepts the gap
    # and policy reports it (warning), rather than losing the workload.
    result = agent.send()["result"]
    assert result["status"] == "warning"
    assert any(r.startswith("chain_gap") for r in result["reasons"])


def test_broken_chain(server: ServerProcess, admin: OperatorClient) -> None:
    agent = Agent(server, admin)
    agent.send()

    def tamper(claims: dict[str, Any]) -> None:
        claims["bam_prev"] = "f" * 64

    broken = resign(agent.token(), agent.signer, tamper)
    _expect("chain_broken", 422, agent.client.submit, broken)


def test_oversized_body_and_error_bodies(server: ServerProcess, admin: OperatorClient) -> None:
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/evidence", json={"token": "a" * (100 * 1024)})
        assert r.status_code == 413
        assert r.json()["reason"] == "body_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the stream itself is counted
            yield b'{"token": "'
            for _ in range(100):
                yield b"a" * 1024
            yield b'"}'

        r = http.post(
            "/v1/evidence", content=chunks(), headers={"content-type": "application/json"}
        )
        assert (r.status_code, r.json()["reason"]) == (413, "body_too_large")
        r = http.post(
            "/v1/evidence", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert (r.status_code, r.json()["reason"]) == (422, "request_invalid")
        r = http.get("/v1/no-such-thing")
        assert (r.status_code, r.json()["reason"]) == (404, "not_found")
        r = http.get("/v1/workloads")
        assert (r.status_code, r.json()["reason"]) == (401, "auth_required")
        for resp in (r,):
            assert "Traceback" not in resp.text


def test_broken_policy_upload_refused_and_versions(
    server: ServerProcess, admin: OperatorClient
) -> None:
    before = admin.get("/v1/policy")
    broken = 'package bam.policy\nimport rego.v1\n\ndecision := {"status": \n'
    err = _expect("policy_invalid", 422, admin.put, "/v1/policy", {"source": broken})
    assert "bam.rego:" in err.message  # the Rego error with its location
    assert admin.get("/v1/policy")["version"] == before["version"]

    wrong_shape = (
        'package bam.policy\nimport rego.v1\n\ndecision := {"status": "fine", "action": "allow"}\n'
    )
    _expect("policy_output_invalid", 422, admin.put, "/v1/policy", {"source": wrong_shape})

    stored = admin.put("/v1/policy", {"source": default_source() + "\n# v2\n", "name": "bam"})
    assert stored["version"] == before["version"] + 1
    agent = Agent(server, admin)
    result = agent.send()["result"]
    assert (result["policy_id"], result["policy_version"]) == (
        stored["policy_id"],
        stored["version"],
    )


def test_stale_workload(server: ServerProcess, admin: OperatorClient) -> None:
    agent = Agent(server, admin, interval_s=1.0)
    agent.send()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        wl = admin.get(f"/v1/workloads/{agent.workload}")
        if wl["stale"]:
            break
        time.sleep(0.2)
    assert wl["stale"] is True
    latest = admin.get(f"/v1/workloads/{agent.workload}/results", limit=1)["results"][0]
    assert latest["trigger"] == "stale"
    assert latest["status"] == "warning"
    assert any(r.startswith("stale") for r in latest["reasons"])
    gate = admin.get(f"/v1/access/{agent.workload}")
    assert (gate["allow"], gate["stale"]) == (False, True)
    assert "stale" in [a["event"] for a in admin.get("/v1/audit", workload=agent.workload)["audit"]]
    # Fresh evidence brings it back.
    assert agent.send()["result"]["status"] == "affirming"
    assert admin.get(f"/v1/workloads/{agent.workload}")["stale"] is False


def test_operator_roles_and_metrics(server: ServerProcess, admin: OperatorClient) -> None:
    viewer_token = admin.post(
        "/v1/admin/operator-tokens", {"name": f"viewer-{next(_counter)}", "role": "viewer"}
    )["token"]
    agent = Agent(server, admin)
    agent.send()
    with OperatorClient(server.url, viewer_token) as viewer:
        assert any(w["name"] == agent.workload for w in viewer.get("/v1/workloads")["workloads"])
        _expect("forbidden", 403, viewer.post, f"/v1/workloads/{agent.workload}/ack", {})
        _expect("forbidden", 403, viewer.put, "/v1/policy", {"source": default_source()})
        text = viewer.http.get("/metrics").text
    assert "bam_evidence_verified_total" in text
    assert "bam_policy_decisions_total" in text
    assert 'bam_evidence_rejected_total{reason="' in text
    with OperatorClient(server.url, "bamop_not-a-real-token") as nobody:
        _expect("auth_invalid", 401, nobody.get, "/v1/workloads")


def test_concurrent_agents_one_server(server: ServerProcess, admin: OperatorClient) -> None:
    """Several agents at once: every evidence stored once, chains intact."""
    agents = [Agent(server, admin) for _ in range(4)]
    errors: list[BaseException] = []

    def run(a: Agent) -> None:
        try:
            for _ in range(10):
                a.send()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a in agents:
        seqs = sorted(
            e["seq"] for e in admin.get(f"/v1/workloads/{a.workload}/evidence")["evidence"]
        )
        assert seqs == list(range(1, 11))


def test_enrolment_token_is_single_use(server: ServerProcess, admin: OperatorClient) -> None:
    token = admin.post("/v1/admin/enrol-tokens", {})["token"]
    a, b = SoftwareSigner.generate(), SoftwareSigner.generate()
    AgentClient(server.url, a).enrol(token, f"once-{next(_counter)}")
    _expect(
        "enrol_token_invalid",
        401,
        AgentClient(server.url, b).enrol,
        token,
        f"twice-{next(_counter)}",
    )
    # A proof by another key than the one registered is refused.
    token2 = admin.post("/v1/admin/enrol-tokens", {})["token"]
    with httpx.Client(base_url=server.url) as http:
        r = http.post(
            "/v1/enrol",
            json={
                "token": token2,
                "name": f"thief-{next(_counter)}",
                "key": b.public_jwk(),
                "proof": b64url_encode(a.sign(b"whatever")),
            },
        )
    assert (r.status_code, r.json()["reason"]) == (401, "proof_invalid")


def _spool_send(client: AgentClient, token: str, deadline: float) -> dict[str, Any]:
    """Send until acknowledged, riding out a server that is down or restarting."""
    while True:
        try:
            return client.submit(token)
        except (httpx.TransportError, ApiError) as e:
            if isinstance(e, ApiError) and e.status < 500:
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_restart_mid_stream_loses_nothing_stores_nothing_twice(
    backend: dict[str, str], admin_token: str, tmp_path: Path
) -> None:
    env = {**backend, "BAM_LOG_LEVEL": "warning", "BAM_STALE_CHECK_S": "30"}
    srv = ServerProcess(env, log_path=tmp_path / "server.log").start()
    try:
        with OperatorClient(srv.url, admin_token) as admin:
            agent = Agent(srv, admin)
        spool: list[str] = []
        acked: list[dict[str, Any]] = []
        n_total, kill_after = 30, 12
        restarted = threading.Event()

        def crash_and_restart() -> None:
            srv.kill()  # SIGKILL: no graceful shutdown, possibly mid-request
            srv.start()
            restarted.set()

        killer: threading.Thread | None = None
        deadline = time.monotonic() + 90
        nonce = agent.nonce
        for i in range(n_total):
            token = agent.token(nonce=nonce)
            spool.append(token)  # the agent spools before sending
            if i == kill_after:
                killer = threading.Thread(target=crash_and_restart)
                killer.start()
            out = _spool_send(agent.client, token, deadline)
            acked.append(out)
            spool.remove(token)
            nonce = out["next_challenge"]["nonce"] if out["next_challenge"] else None
            if nonce is None:  # a retry answered as duplicate: ask for a fresh nonce
                while True:
                    try:
                        nonce = agent.client.challenge()
                        break
                    except (httpx.TransportError, ApiError):
                        time.sleep(0.1)
        assert killer is not None
        killer.join(timeout=60)
        assert restarted.is_set()
        assert not spool
        with OperatorClient(srv.url, admin_token) as admin:
            evidence = admin.get(f"/v1/workloads/{agent.workload}/evidence", limit=1000)["evidence"]
            results = admin.get(f"/v1/workloads/{agent.workload}/results", limit=1000)["results"]
        seqs = sorted(e["seq"] for e in evidence)
        assert seqs == list(range(1, n_total + 1))  # nothing lost, nothing twice
        assert len({e["digest"] for e in evidence}) == n_total
        assert len(results) == n_total
        assert {a["evidence_id"] for a in acked} == {e["id"] for e in evidence}
        assert all(r["status"] == "affirming" for r in results)  # no gap: chain intact
    finally:
        srv.stop()


def test_evidence_hot_path_counts_rate_and_rolls_back_on_refusal(
    backend: dict[str, str], server: ServerProcess
) -> None:
    """In-process, on both backends: the evidence path's own statements (one CTE pair on
    PostgreSQL) count the agent's rate, store nothing when refused, and stay idempotent."""
    from bam.server.auth import enrol_message
    from bam.server.errors import ServerError
    from bam.server.service import A

    settings = _settings(backend).model_copy(update={"agent_requests_per_minute": 5})
    svc = Service(settings, run_migrations=False)
    try:
        token, _ = svc.create_enrol_token("test")
        signer = SoftwareSigner.generate()
        proof = b64url_encode(signer.sign(enrol_message(token, signer.thumbprint())))
        name = f"hot-{time.monotonic_ns() % 10**9}"
        agent_id = svc.enrol(token, name, signer.public_jwk(), None, proof)["agent_id"]
        with svc.read() as conn:
            agent = conn.execute(A.select().where(A.c.id == agent_id)).mappings().first()
        assert agent is not None
        svc.register_workload(agent, name, "process", 300.0)
        builder = EvidenceBuilder(signer)

        def build(nonce: str) -> str:
            return builder.build(nonce, make_measurements(name), make_behavior()).token

        # register_workload was request 1
        first = build(svc.challenge(agent)[0][0])  # request 2
        out = svc.submit_evidence(first)  # request 3
        assert (out.duplicate, out.seq, out.result["status"]) == (False, 1, "affirming")
        assert out.next_nonce is not None
        again = svc.submit_evidence(first)  # a retry: answered from the store, not counted
        assert (again.duplicate, again.evidence_id) == (True, out.evidence_id)
        second = builder.build(out.next_nonce[0], make_measurements(name), make_behavior()).token
        out2 = svc.submit_evidence(second)  # request 4
        assert out2.seq == 2
        assert out2.next_nonce is not None
        with pytest.raises(ServerError) as used:  # the same nonce in a new token: a replay
            svc.submit_evidence(build(out.next_nonce[0]))
        assert used.value.status == 409
        assert used.value.reason in {"nonce_used", "nonce_reused"}
        nxt = out2.next_nonce[0]
        svc.submit_evidence(build(nxt))  # request 5: the budget is spent
        stored = svc.counts()["evidence"]
        with pytest.raises(ServerError) as limited:
            svc.submit_evidence(build(svc_next(svc, agent_id)))
        assert limited.value.reason == "rate_limited"
        assert svc.counts()["evidence"] == stored  # refused: nothing stored, nothing half-done
    finally:
        svc.close()


def svc_next(svc: Service, agent_id: str) -> str:
    """A nonce for ``agent_id`` issued without counting against its rate (test set-up only)."""
    import time as _time

    with svc.write() as conn:
        return svc._insert_nonce(conn, agent_id, _time.time())[0]
