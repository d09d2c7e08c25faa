"""The agent against a real server over loopback (SQLite), with real eBPF capture.

* attests a workload it started, survives a server outage (observations spooled, then all
  delivered, in order, with a gap-free chain);
* killed with SIGKILL mid-run and restarted: the chain continues (no gap, no refusal) and
  the baseline is not learnt again; its resident memory while monitoring is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bam.agent.config import AgentSettings, TargetSpec
from bam.agent.runner import Agent
from bam.evidence.claims import BehaviorSummary, Measurements
from bam.sensors.workload import descendants
from bam.server.client import OperatorClient
from bam.server.harness import ServerProcess
from bam.server.service import Service
from bam.server.settings import ServerSettings
from sensors_support import bam_programs, require_ebpf

WORKLOAD = (
    "import os, time\n"
    "while True:\n"
    "    for _ in range(20): os.stat('/etc/passwd')\n"
    "    open('/etc/hostname').read()\n"
    "    time.sleep(0.01)\n"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("agent-server")
    return {
        "BAM_SERVER_DIR": str(root / "server"),
        "BAM_DATA_DIR": str(root / "data"),
        "BAM_LOG_LEVEL": "warning",
        "BAM_POLICY_REFRESH_S": "0",
        "BAM_NONCE_TTL_S": "2",  # short, so a token stranded by a crash expires in the test
    }


@pytest.fixture(scope="module")
def admin_token(env: dict[str, str]) -> str:
    svc = Service(ServerSettings(server_dir=Path(env["BAM_SERVER_DIR"])))
    try:
        return svc.create_operator_token("admin", "admin", "test")
    finally:
        svc.close()


@pytest.fixture
def server(env: dict[str, str], admin_token: str, tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(env, log_path=tmp_path / "server.log") as srv:
        yield srv


def _evidence(srv: ServerProcess, token: str, workload: str) -> list[dict[str, Any]]:
    with OperatorClient(srv.url, token) as op:
        rows: list[dict[str, Any]] = op.get(f"/v1/workloads/{workload}/evidence", limit=5000)[
            "evidence"
        ]
        results = op.get(f"/v1/workloads/{workload}/results", limit=1000)["results"]
    gaps = [r for r in results if any("chain_gap" in x for x in r["reasons"])]
    assert not gaps, f"the server saw chain gaps: {gaps}"
    return sorted(rows, key=lambda r: r["seq"])


def _enrol_token(srv: ServerProcess, token: str, note: str) -> str:
    with OperatorClient(srv.url, token) as op:
        return str(op.post("/v1/admin/enrol-tokens", {"note": note})["token"])


def test_agent_attests_and_spools_through_an_outage(
    server: ServerProcess, admin_token: str, tmp_path: Path
) -> None:
    require_ebpf()
    settings = AgentSettings(
        server_url=server.url,
        enrol_token=_enrol_token(server, admin_token, "outage"),
        name="agent-outage",
        data_dir=tmp_path / "agent",
        interval_s=0.5,
        tls_verify=False,
        request_timeout_s=2.0,
        targets=[
            TargetSpec(name="wl-outage", command=[sys.executable, "-c", WORKLOAD], profile_s=3.0)
        ],
    )
    observed: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []

    def on_event(e: dict[str, Any]) -> None:
        if e["type"] == "observation":
            observed.append(e)
        elif e["type"] == "result":
            results.append(e)

    with Agent(settings, on_event=on_event) as agent:
        agent.enrol()
        agent.start_targets()
        agent.run(duration_s=5.0)
        assert results, "nothing was delivered while the server was up"
        assert all(r["ok"] for r in results)
        server.kill()  # crash: no graceful shutdown
        agent.run(duration_s=3.0)
        assert not agent.delivery.server_up
        spooled = agent.spool.pending_count()
        assert spooled >= 3, f"expected observations to pile up, {spooled} spooled"
        server.start()  # same port, same database
        deadline = time.monotonic() + 20
        while agent.spool.pending_count() or agent.spool.inflight() is not None:
            assert time.monotonic() < deadline, "spool was not drained"
            agent.run(duration_s=0.5)
        n_obs = len(observed)
        stats = agent.stats()
    rows = _evidence(server, admin_token, "wl-outage")
    # nothing lost: every observation made it, once, in order, with a contiguous chain
    assert [r["seq"] for r in rows] == list(range(1, n_obs + 1))
    ends = [r["window_end"] for r in rows]
    assert ends == sorted(ends)
    assert stats["spool_dropped"] == 0
    assert bam_programs() == [], "eBPF programs left attached"
    assert not list(Path("/sys/fs/cgroup/unified").glob("bam-wl-outage"))


def _agent_proc(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return _popen(config, out)


def _popen(config: Path, out: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from bam.cli import main; main()",
            "agent",
            "run",
            "--config",
            str(config),
            "--json",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait_evidence(srv: ServerProcess, token: str, wl: str, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            got = len(_evidence(srv, token, wl))
            if got >= n:
                return got
        time.sleep(0.3)
    raise AssertionError(f"fewer than {n} evidence for {wl} after {timeout} s")


def test_sigkill_and_restart_continue_the_chain(
    server: ServerProcess, admin_token: str, tmp_path: Path
) -> None:
    require_ebpf()
    work = subprocess.Popen([sys.executable, "-c", WORKLOAD], start_new_session=True)
    data = tmp_path / "agent"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'server_url = "{server.url}"\n'
        f'enrol_token = "{_enrol_token(server, admin_token, "kill")}"\n'
        'name = "agent-kill"\n'
        f'data_dir = "{data}"\n'
        "interval_s = 0.4\n"
        "tls_verify = false\n"
        "[[targets]]\n"
        'name = "wl-kill"\n'
        f"pid = {work.pid}\n"
        "profile_s = 3.0\n"
    )
    log = tmp_path / "agent.log"
    agent = _agent_proc(config, log)
    try:
        first = _wait_evidence(server, admin_token, "wl-kill", 4, 60)
        rss = _rss_mb(agent.pid)
        print(f"agent RSS while monitoring one workload: {rss:.1f} MB")
        assert rss < 150, f"agent RSS {rss:.1f} MB"
        os.kill(agent.pid, signal.SIGKILL)  # mid-run, no chance to clean up
        agent.wait(10)
        baseline_files = list((data / "baselines").glob("*.bamb"))
        assert len(baseline_files) == 1
        mtime = baseline_files[0].stat().st_mtime
        agent = _agent_proc(config, log)
        _wait_evidence(server, admin_token, "wl-kill", first + 4, 60)
        assert baseline_files[0].stat().st_mtime == mtime, "profiled again after restart"
        agent.send_signal(signal.SIGTERM)
        agent.wait(20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            agent.wait(5)
        for p in descendants([work.pid]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        work.wait(5)
    rows = _evidence(server, admin_token, "wl-kill")  # asserts: no chain gap reported
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), log.read_text()[-2000:]
    assert bam_programs() == []
    assert not list(Path("/sys/fs/cgroup/unified").glob("bam-wl-kill"))


def _payload(workload: str) -> dict[str, Any]:
    from evidence_support import make_behavior, make_measurements

    return {
        "behavior": make_behavior("none").model_dump(mode="json", exclude_none=True),
        "measurements": make_measurements(workload).model_dump(mode="json", exclude_none=True),
    }


def _sign_inflight(agent: Agent) -> str:
    """What the delivery does up to the crash point: sign, then commit token + chain."""
    p = agent.spool.oldest()
    assert p is not None
    ms = Measurements.model_validate_json(json.dumps(p.payload["measurements"]))
    beh = BehaviorSummary.model_validate_json(json.dumps(p.payload["behavior"]))
    prev = agent.spool.chain_state()
    ev = agent.builder.build(agent.client.challenge(), ms, beh)
    assert agent.chain.last_saved is not None
    agent.spool.commit_signed(p.id, prev, agent.chain.last_saved, ev.token)
    return ev.token


def test_crash_between_signing_and_answer_leaves_no_gap(
    server: ServerProcess, admin_token: str, tmp_path: Path
) -> None:
    """Both crash windows: the token never reached the server (its nonce expires meanwhile:
    re-signed at the same seq), and the server stored it but the agent never learnt it (resent
    verbatim: ``duplicate``)."""
    wl = "wl-crash"
    settings = AgentSettings(
        server_url=server.url,
        enrol_token=_enrol_token(server, admin_token, "crash"),
        name="agent-crash",
        data_dir=tmp_path / "agent",
        tls_verify=False,
    )
    agent = Agent(settings)
    agent.enrol()
    agent.client.register_workload(wl, "process", 30)
    for _ in range(3):
        agent.spool.push(wl, "none", _payload(wl))
    first = agent.delivery.pump()
    assert [d.seq for d in first] == [1, 2, 3]
    # crash 1: signed and stored in flight, never sent; the nonce expires while "down"
    agent.spool.push(wl, "none", _payload(wl))
    _sign_inflight(agent)
    agent.close()
    time.sleep(2.5)
    agent = Agent(settings)
    out = agent.delivery.pump()
    assert [(d.seq, d.ok, d.duplicate) for d in out] == [(4, True, False)]
    # crash 2: the server stored it, the answer was lost
    agent.spool.push(wl, "none", _payload(wl))
    token = _sign_inflight(agent)
    agent.client.submit(token)
    agent.close()
    agent = Agent(settings)
    agent.spool.push(wl, "none", _payload(wl))
    out = agent.delivery.pump()
    assert [(d.seq, d.duplicate) for d in out] == [(5, True), (6, False)]
    assert agent.spool.pending_count() == 0
    agent.close()
    rows = _evidence(server, admin_token, wl)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
