"""``bam watch -- CMD``: embedded server, profile, attest; JSON events; nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
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
