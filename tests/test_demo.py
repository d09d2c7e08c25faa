"""``bam demo --json --quick``: the live demo end to end, as a user runs it (root, eBPF, nft)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import require, require_tool
from sensors_support import bam_programs, require_ebpf


def test_demo_detects_and_isolates_the_attack(tmp_path: Path) -> None:
    require_ebpf()
    require_tool("nft")
    require_tool("bash")
    require(Path("/sys/fs/cgroup/unified/cgroup.procs").exists(), "cgroup v2 (unified)")
    report = tmp_path / "report.html"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from bam.cli import main; main()",
            "demo",
            "--json",
            "--quick",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["benign_alerts"] == 0, out
    assert out["attack_detected"] is True, out
    assert out["detection_latency_s"] is not None
    assert out["detection_latency_s"] < 2.0, out
    assert out["evidence_verified"] is True
    assert out["action"] == "isolate"
    assert out["action_verified"] is True, out["checks"]
    assert out["checks"]["attacker_had_shell"] is True  # the attack really happened
    assert out["agent_rss_mb"] < 150
    assert 0 < out["agent_cpu_overhead"] < 1
    assert out["duration_s"] < 120
    for key in (
        "benign_alerts",
        "attack_detected",
        "detection_latency_s",
        "evidence_verified",
        "action",
        "action_verified",
        "agent_cpu_overhead",
        "agent_rss_mb",
        "duration_s",
    ):
        assert key in out
    html = report.read_text()
    assert "<svg" in html
    assert "isolate" in html
    # nothing left behind
    assert bam_programs() == []
    assert not Path("/sys/fs/cgroup/unified/bam-notes").exists()
    nft = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False)
    assert "bam_iso_" not in nft.stdout
