"""Group commit, the policy decision cache and its input projection, the rego thread.

The rules under test: a write is acknowledged only after the COMMIT that holds it; a failing
unit of a batch is undone alone; a cached decision is never served for another policy; a
policy is given every input path it references; rego-cpp runs on one thread only; and a
two-worker SQLite server killed mid-stream loses nothing acknowledged and stores nothing twice.
"""

from __future__ import annotations

import asyncio
import copy
import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bam.evidence import EvidenceBuilder, SoftwareSigner
from bam.server.client import AgentClient, ApiError
from bam.server.db.groupcommit import CommitFailedError, LoopGroupCommitter
from bam.server.harness import ServerProcess
from bam.server.policy import (
    DECISIONS,
    PolicyVersion,
    default_source,
    evaluate,
    input_paths,
    project,
    sample_inputs,
)
from bam.server.service import Service
from bam.server.settings import ServerSettings
from evidence_support import make_behavior, make_measurements

# ---- group commit ---------------------------------------------------------------------------


def _db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER UNIQUE)")
    return conn


def _insert(v: int) -> Any:
    def work(cur: Any) -> int:
        cur.execute("INSERT INTO t (v) VALUES (?)", (v,))
        return v

    return work


def _stored(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return sorted(r[0] for r in conn.execute("SELECT v FROM t"))


def test_units_of_one_batch_share_a_commit_and_fail_alone(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    committer = LoopGroupCommitter(_db(db), lock_path=tmp_path / "g.lock")

    async def main() -> list[Any]:
        # queued in one loop iteration: one transaction; unit 2 violates UNIQUE (v=1 again)
        return await asyncio.gather(
            committer.run(_insert(1)),
            committer.run(_insert(1)),
            committer.run(_insert(3)),
            return_exceptions=True,
        )

    out = asyncio.run(main())
    committer.close()
    assert out[0] == 1
    assert out[2] == 3
    assert isinstance(out[1], sqlite3.IntegrityError)
    assert (committer.batches, committer.units) == (1, 3)
    assert _stored(db) == [1, 3]  # the failing unit undone, its neighbours kept


class _CommitFails:
    """A connection whose COMMIT fails (a full disk, an I/O error)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        return self.conn.execute(sql, *args)

    def cursor(self) -> Any:
        outer = self

        class Cursor:
            def __init__(self) -> None:
                self.cur = outer.conn.cursor()

            def execute(self, sql: str, *args: Any) -> Any:
                if sql == "COMMIT":
                    raise sqlite3.OperationalError("disk I/O error")
                return self.cur.execute(sql, *args)

        return Cursor()

    def close(self) -> None:
        self.conn.close()


def test_nothing_is_acknowledged_when_the_commit_fails(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    committer = LoopGroupCommitter(_CommitFails(_db(db)))

    async def main() -> list[Any]:
        return await asyncio.gather(
            committer.run(_insert(1)), committer.run(_insert(2)), return_exceptions=True
        )

    out = asyncio.run(main())
    committer.close()
    assert all(isinstance(o, CommitFailedError) for o in out)  # no unit reports success
    assert _stored(db) == []


def test_no_answer_while_another_writer_holds_the_lock(tmp_path: Path) -> None:
    """A unit waits (the loop keeps running) while another process writes; then commits."""
    db, lock = tmp_path / "g.db", tmp_path / "g.lock"
    committer = LoopGroupCommitter(_db(db), lock_path=lock)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another worker" is writing
    other = _db(db)
    other.execute("BEGIN IMMEDIATE")  # ... and a writer outside the flock (the CLI) too

    async def main() -> tuple[bool, int]:
        task = asyncio.ensure_future(committer.run(_insert(7)))
        await asyncio.sleep(0.05)
        waiting = not task.done()
        fcntl.flock(fd, fcntl.LOCK_UN)  # the worker is done; SQLite's lock is still held
        await asyncio.sleep(0.05)
        waiting = waiting and not task.done()
        other.execute("COMMIT")
        return waiting, await asyncio.wait_for(task, 5)

    waited, value = asyncio.run(main())
    committer.close()
    os.close(fd)
    other.close()
    assert (waited, value) == (True, 7)
    assert _stored(db) == [7]


# ---- policy: input projection and the decision cache ----------------------------------------


def test_the_default_policy_reads_discrete_findings_only() -> None:
    paths = input_paths(default_source())
    assert paths is not None
    assert ("behavior", "severity") in paths
    assert not any(p[:2] == ("behavior", "scores") for p in paths)
    assert ("evidence", "seq") not in paths
    assert ("evidence", "iat") not in paths


def test_a_policy_gets_every_path_it_names_and_the_whole_input_when_unsure() -> None:
    src = (
        'x := "# not a comment: input.a"\n# input.b (a comment)\n'
        'y := input.c["d"].e[k]\nz := input.behavior\nw := input.behavior.scores.hmm\n'
    )
    assert input_paths(src) == frozenset({("a",), ("c", "d", "e"), ("behavior",)})
    assert input_paths('x := object.get(input, "a", 1)') is None
    assert input_paths("import input\n") is None
    doc = {"a": 1, "b": 2, "c": {"d": {"e": [1], "f": 0}}, "behavior": None}
    assert project(doc, input_paths(src)) == {"a": 1, "c": {"d": {"e": [1]}}, "behavior": None}
    assert project(doc, None) is doc


def test_a_policy_reading_scores_is_given_them_and_cached_on_them() -> None:
    src = (
        "package bam.policy\nimport rego.v1\n"
        'status := "warning" if input.behavior.scores.hmm > 5 else := "affirming"\n'
        'decision := {"status": status, "action": "allow", "reasons": [], '
        '"trust_vector": {}, "clear_hold": false}\n'
    )
    pv = PolicyVersion("scores", 1, src)
    low, high = copy.deepcopy(sample_inputs()[0]), copy.deepcopy(sample_inputs()[0])
    low["behavior"]["scores"] = {"hmm": 1.0}
    high["behavior"]["scores"] = {"hmm": 9.0}
    assert evaluate(pv, low).status == "affirming"
    assert evaluate(pv, high).status == "warning"  # not the cached answer for ``low``


def test_a_new_policy_version_never_gets_the_old_versions_decisions() -> None:
    DECISIONS.clear()
    v1 = PolicyVersion("bam-default", 1, default_source())
    doc = sample_inputs()[0]
    assert evaluate(v1, doc).status == "affirming"
    assert evaluate(v1, copy.deepcopy(doc)).status == "affirming"
    assert DECISIONS.hits == 1
    strict = default_source().replace('else := "affirming"', 'else := "warning"')
    v2 = PolicyVersion("bam-default", 2, strict)
    assert evaluate(v2, doc).status == "warning"


def test_service_applies_a_policy_change_to_the_next_evidence(tmp_path: Path) -> None:
    from bam.evidence.canonical import b64url_encode
    from bam.server.auth import enrol_message
    from bam.server.service import A

    svc = Service(ServerSettings(server_dir=tmp_path / "s", policy_refresh_s=0))
    try:
        token, _ = svc.create_enrol_token("test")
        signer = SoftwareSigner.generate()
        proof = b64url_encode(signer.sign(enrol_message(token, signer.thumbprint())))
        agent_id = svc.enrol(token, "pc", signer.public_jwk(), None, proof)["agent_id"]
        with svc.read() as conn:
            agent = conn.execute(A.select().where(A.c.id == agent_id)).mappings().first()
        assert agent is not None
        svc.register_workload(agent, "pc-wl", "process", 300.0)
        builder = EvidenceBuilder(signer)

        def send(nonce: str) -> Any:
            return svc.submit_evidence(
                builder.build(nonce, make_measurements("pc-wl"), make_behavior()).token
            )

        first = send(svc.challenge(agent)[0][0])
        assert first.result["status"] == "affirming"
        strict = default_source().replace('else := "affirming"', 'else := "warning"')
        svc.set_policy(strict, "test")
        second = send(first.next_nonce[0])
        assert (second.result["status"], second.result["policy_version"]) == ("warning", 2)
    finally:
        svc.close()


# ---- rego thread ------------------------------------------------------------------------------


def test_rego_runs_on_one_thread_whoever_asks() -> None:
    from bam.server import policy as p

    seen: set[str] = set()
    original = p._Compiled.evaluate

    def spy(self: Any, document: dict[str, Any], source: str) -> Any:
        seen.add(threading.current_thread().name)
        return original(self, document, source)

    pv = PolicyVersion("bam-default", 1, default_source() + "\n# thread test\n")
    p._Compiled.evaluate = spy  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(20):
                doc = copy.deepcopy(sample_inputs()[j % 5])
                doc["evidence"]["chain_missing"] = i * 100 + j  # distinct: no cache hits
                doc["evidence"]["chain_gap"] = True
                assert evaluate(pv, doc).status in {"warning", "contraindicated"}
        except BaseException as e:  # reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        p._Compiled.evaluate = original  # type: ignore[method-assign]
    assert not errors
    assert len(seen) == 1
    assert next(iter(seen)).startswith("bam-rego")


# ---- two workers, SQLite, killed mid-stream ---------------------------------------------------


def _spool_send(client: AgentClient, token: str, deadline: float) -> dict[str, Any]:
    while True:
        try:
            out: dict[str, Any] = client.submit(token)
            return out
        except (httpx.TransportError, ApiError) as e:
            if isinstance(e, ApiError) and e.status < 500:
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_two_workers_killed_mid_stream_lose_nothing_and_store_nothing_twice(
    tmp_path: Path,
) -> None:
    server_dir = tmp_path / "server"
    svc = Service(ServerSettings(server_dir=server_dir))
    tokens = [svc.create_enrol_token("test")[0] for _ in range(3)]
    svc.close()
    env = {"BAM_SERVER_DIR": str(server_dir), "BAM_LOG_LEVEL": "warning"}
    srv = ServerProcess(env, workers=2, log_path=tmp_path / "server.log").start()
    n_total = 40
    acked: dict[str, list[dict[str, Any]]] = {}
    failures: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            signer = SoftwareSigner.generate()
            client = AgentClient(srv.url, signer)
            name = f"kill-{i}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.enrol(tokens[i], name)
                    client.register_workload(name, "process", 300.0)
                    nonce = client.challenge()
                    break
                except (httpx.TransportError, ApiError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            builder = EvidenceBuilder(signer)
            mine = acked[name] = []
            for _ in range(n_total):
                token = builder.build(nonce, make_measurements(name), make_behavior()).token
                out = _spool_send(client, token, deadline)  # resent until acknowledged
                mine.append(out)
                nonce = out["next_challenge"]["nonce"] if out["next_challenge"] else None
                while nonce is None:  # a retry answered as a duplicate: ask for a nonce
                    try:
                        nonce = client.challenge()
                    except (httpx.TransportError, ApiError):
                        time.sleep(0.1)
            client.close()
        except BaseException as e:  # reported below
            failures.append(e)

    try:
        threads = [threading.Thread(target=agent, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        srv.kill()  # SIGKILL, both workers, mid-stream
        srv.start()
        for t in threads:
            t.join(timeout=150)
        assert not failures, failures
        svc = Service(ServerSettings(server_dir=server_dir), run_migrations=False)
        try:
            for name, outs in acked.items():
                rows = svc.evidence(name, limit=1000)
                assert sorted(r["seq"] for r in rows) == list(range(1, n_total + 1))
                assert {o["evidence_id"] for o in outs} == {r["id"] for r in rows}
                assert all(r["status"] == "affirming" for r in svc.results(name, limit=1000))
        finally:
            svc.close()
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    DECISIONS.clear()
