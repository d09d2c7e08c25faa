"""``bam server`` administration commands and ``bam bench server`` (in-process CLI)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from typer.testing import CliRunner

from bam.cli import app
from bam.server.db.engine import alembic_config
from bam.server.policy import default_source


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BAM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BAM_DATABASE_URL", raising=False)
    monkeypatch.delenv("BAM_SERVER_DIR", raising=False)
    monkeypatch.setenv("BAM_CONFIG", str(tmp_path / "none.toml"))
    return tmp_path


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_init_makes_database_key_tls_and_admin_token(home: Path) -> None:
    code, out, err = _run("server", "init", "--json")
    assert code == 0, out + err
    info = json.loads(out)
    server_dir = home / "data" / "server"
    assert info["database"].startswith("sqlite:///")
    assert (server_dir / "bam.db").exists()
    newest = ScriptDirectory.from_config(alembic_config(info["database"])).get_current_head()
    assert info["schema_revision"] == newest
    assert info["policy"] == "bam-default@v1"
    assert info["admin_token"].startswith("bamop_")
    token_file = Path(info["admin_token_file"])
    assert token_file.read_text().strip() == info["admin_token"]
    assert token_file.stat().st_mode & 0o077 == 0
    for name in ("ca.pem", "server.pem", "server-key.pem", "ca-key.pem"):
        assert (server_dir / "tls" / name).exists()
    assert (server_dir / "tls" / "server-key.pem").stat().st_mode & 0o077 == 0
    assert (server_dir / "keys" / "server-ed25519.pem").stat().st_mode & 0o077 == 0
    # Idempotent: a second init keeps the token and the certificates.
    code, out, _ = _run("server", "init", "--json")
    assert code == 0
    assert "admin_token" not in json.loads(out)


def test_tokens_policy_ack_and_workloads(home: Path, tmp_path: Path) -> None:
    assert _run("server", "init", "--no-tls")[0] == 0
    code, out, _ = _run("server", "token", "create", "--note", "host-1", "--json")
    assert code == 0
    assert json.loads(out)["token"].startswith("bamenr_")
    code, out, _ = _run("server", "token", "create", "--operator", "grafana", "--role", "viewer")
    assert code == 0
    assert out.strip().startswith("bamop_")
    assert _run("server", "token", "revoke", "grafana")[0] == 0

    broken = tmp_path / "broken.rego"
    broken.write_text("package bam.policy\nimport rego.v1\ndecision := {\n")
    code, out, err = _run("server", "policy", "set", str(broken))
    assert code == 2
    assert "policy_invalid" in err
    assert "bam.rego:3:" in " ".join(err.split())  # the Rego error, with its location
    good = tmp_path / "good.rego"
    good.write_text(default_source())
    code, out, _ = _run("server", "policy", "set", str(good), "--json")
    assert code == 0
    assert json.loads(out)["version"] == 2
    code, out, _ = _run("server", "policy", "list", "--json")
    assert [p["version"] for p in json.loads(out)["policies"]] == [2, 1]

    code, _, err = _run("server", "ack", "no-such-workload")
    assert code == 2
    assert "workload_unknown" in err
    code, _, err = _run("server", "reset-chain", "no-such-agent")
    assert code == 2
    assert "agent_unknown" in err
    code, out, _ = _run("server", "workloads", "--json")
    assert code == 0
    assert json.loads(out) == {"workloads": []}


@pytest.mark.slow
def test_bench_server_json_shape(home: Path) -> None:
    code, out, err = _run(
        "bench",
        "server",
        "--json",
        "--database",
        "sqlite",
        "--agents",
        "2",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--workers",
        "1",
        "--batch",
        "1",
        "--batch",
        "4",
        "--rounds",
        "2",
    )
    assert code == 0, out + err
    result = json.loads(out)
    # the two configurations, interleaved: single, batched, single, batched
    assert [(r["round"], r["batch"]) for r in result["runs"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    summary = {s["batch"]: s for s in result["summary"]}
    assert summary[4]["rounds"] == 2
    lo, hi = summary[4]["evidence_per_s_range"]
    assert lo <= summary[4]["evidence_per_s_median"] <= hi
    assert summary[4]["errors"] == 0
    single, batched = result["runs"][2:]
    for run in (single, batched):
        for key in ("database", "agents", "evidence_per_s", "p50_ms", "p99_ms", "errors"):
            assert key in run
        assert run["database"] == "sqlite"
        assert run["agents"] == 2
        assert run["evidence_per_s"] > 0
        assert run["errors"] == 0
    assert (single["batch"], batched["batch"]) == (1, 4)
    # every measured request of the batched run carried 4 stored tokens
    assert batched["measured"] == 4 * round(batched["requests_per_s"] * batched["duration_s"])
    assert run["p50_ms"] <= run["p99_ms"]
    assert run["stored_total"] >= run["measured"]
    assert os.cpu_count() == result["cpus"]


@pytest.mark.slow
def test_bench_server_files_full_and_by_reference(home: Path) -> None:
    code, out, err = _run(
        "bench", "server", "--json", "--database", "sqlite", "--agents", "1",
        "--duration", "1", "--warmup", "0.5", "--workers", "1", "--batch", "2",
        "--files", "full", "--files", "reference",
    )  # fmt: skip
    assert code == 0, out + err
    runs = json.loads(out)["runs"]
    assert [r["files"] for r in runs] == ["full", "reference"]
    assert all(r["errors"] == 0 and r["measured"] > 0 for r in runs)
    code, out, err = _run("bench", "server", "--database", "sqlite", "--files", "some")
    assert code == 2
    assert "--files 'some'" in err


@pytest.mark.slow
def test_bench_server_stopped_by_sigterm_stops_what_it_started(home: Path) -> None:
    """A benchmark killed from outside (a timeout) must not leave its server running."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "BAM_DATA_DIR": str(home / "data")}
    cmd = [sys.executable, "-c", "from bam.cli import main; main()", "bench", "server"]
    proc = subprocess.Popen(
        [*cmd, "--database", "sqlite", "--duration", "60", "--agents", "1", "--workers", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        server = None
        deadline = time.monotonic() + 60
        while server is None and time.monotonic() < deadline:
            for entry in Path("/proc").iterdir():
                try:
                    cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                if ppid == proc.pid and b"run" in cmdline and b"server" in cmdline:
                    server = int(entry.name)
            time.sleep(0.2)
        assert server is not None, "the benchmark did not start a server"
        time.sleep(3)  # agents enrolled and sending
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert b"interrupted" in err
        assert not Path(f"/proc/{server}").exists(), "the server outlived the benchmark"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
