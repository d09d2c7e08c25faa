"""``bam watch -- CMD``: embedded server, profile, attest; JSON events; nothing left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from sensors_support import bam_programs, require_ebpf

LOOP = (
    "import os, time\nwhile True:\n    [os.stat('/etc') for _ in range(10)]\n    time.sleep(0.02)\n"
)


def test_watch_profiles_then_attests_with_an_embedded_server() -> None:
    require_ebpf()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from bam.cli import main; main()",
            "watch",
            "--json",
            "--profile",
            "3",
            "--interval",
            "1",
            "--duration",
            "10",
            "--name",
            "watched",
            "--",
            sys.executable,
            "-c",
            LOOP,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    phases = [e["phase"] for e in events if e["type"] == "phase"]
    assert phases[:2] == ["profiling", "monitoring"]
    results = [e for e in events if e["type"] == "result"]
    assert len(results) >= 3
    assert all(r["ok"] for r in results)
    assert [r["seq"] for r in results] == list(range(1, len(results) + 1))
    stats = events[-1]
    assert stats["type"] == "stats"
    assert stats["spool_pending"] == 0
    assert bam_programs() == []
    assert not Path("/sys/fs/cgroup/unified/bam-watched").exists()


def test_watch_profiles_until_told() -> None:
    """``--until-told``: profiling lasts until SIGUSR1 (or Enter), not a fixed time."""
    require_ebpf()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from bam.cli import main; main()",
            "watch",
            "--json",
            "--until-told",
            "--interval",
            "1",
            "--duration",
            "60",
            "--name",
            "told",
            "--",
            sys.executable,
            "-c",
            LOOP,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        events: list[dict[str, object]] = []
        for line in proc.stdout:
            if line.startswith("{"):
                events.append(json.loads(line))
                if events[-1].get("phase") == "profiling":
                    break
        t_profiling = time.monotonic()
        time.sleep(4.0)  # well past any default; still profiling, since nobody said stop
        proc.send_signal(signal.SIGUSR1)
        for line in proc.stdout:
            if line.startswith("{"):
                e = json.loads(line)
                events.append(e)
                if e.get("type") == "phase" and e.get("phase") == "monitoring":
                    break
        told_after = time.monotonic() - t_profiling
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    phases = [e["phase"] for e in events if e["type"] == "phase"]
    assert phases == ["profiling", "monitoring"]
    assert told_after >= 4.0
    assert proc.returncode == 0
    assert bam_programs() == []
    assert not Path("/sys/fs/cgroup/unified/bam-told").exists()


def test_watch_without_a_command_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from bam.cli import main; main()", "watch"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "no command given" in proc.stderr
