"""``bam bench agent``: what watching a workload costs it, measured side by side in one run.

A fixed-work workload (file writes and reads, ``stat`` calls, a loopback socket echo and a
little computation per iteration; ~10k system calls/s) runs throughout and logs the wall and
CPU time of every iteration. The run has three phases of equal length: **off** (no agent),
**on** (a real ``bam agent run`` process, started as a separate process with the workload as
its ``pid`` target, after its profiling phase: eBPF capture, scoring, signed evidence to an
embedded server every second) and **off** again. The slowdown is the workload's median
iteration time while monitored over the median of both unmonitored phases, so a drift of the
shared machine's load during the run shows up as a difference between the two off phases
(reported) instead of as overhead. The agent's own CPU share and resident memory are read
from ``/proc`` while it monitors.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import IO, Any

from bam.agent.embedded import EmbeddedServer
from bam.agent.runner import rss_mb
from bam.errors import BamError

WORKLOAD = textwrap.dedent(
    """
    import os, socket, sys, time
    out, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    a, b = socket.socketpair()
    block = os.urandom(4096)
    log = open(out, "w", buffering=1)
    while True:
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(20):
            p = os.path.join(work, f"f{i}")
            with open(p, "wb") as f:
                for _ in range(4):
                    f.write(block)
            with open(p, "rb") as f:
                while f.read(4096):
                    pass
            os.stat(p)
            a.sendall(block[:512]); b.recv(512)
        sum(x * x for x in range(2000))
        log.write(f"{time.monotonic()} {time.perf_counter() - w0} {time.process_time() - c0}\\n")
    """
)


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (its own threads, not children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _iterations(log: Path, t0: float, t1: float) -> tuple[list[float], list[float]]:
    wall: list[float] = []
    cpu: list[float] = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and t0 <= float(parts[0]) < t1:
            wall.append(float(parts[1]))
            cpu.append(float(parts[2]))
    return wall, cpu


class _AgentEvents:
    """Reads the agent's ``--json`` event lines on a thread; remembers its phases."""

    def __init__(self, stream: IO[str]) -> None:
        self.phases: list[str] = []
        self.results = 0
        self.levels: dict[str, int] = {}
        self.stats: dict[str, Any] = {}
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip())
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                if e.get("type") == "phase":
                    self.phases.append(str(e.get("phase")))
                elif e.get("type") == "result":
                    self.results += 1
                elif e.get("type") == "observation":
                    level = str(e.get("severity", "?"))
                    self.levels[level] = self.levels.get(level, 0) + 1
                elif e.get("type") == "stats":
                    self.stats = e

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def bench_agent(
    phase_s: float = 20.0,
    profile_s: float = 20.0,
    interval_s: float = 1.0,
    events_log: Path | None = None,
) -> dict[str, Any]:
    """Run off / on / off phases of ``phase_s`` seconds each; see the module docstring.

    ``events_log``: where to keep the agent's JSON event lines (scores, severities, results).
    """
    with tempfile.TemporaryDirectory(prefix="bam-bench-agent-") as tmp:
        root = Path(tmp)
        server = EmbeddedServer(root, in_process=False).start()
        log = root / "iterations.log"
        work = subprocess.Popen(
            [sys.executable, "-c", WORKLOAD, str(log), str(root / "work")],
            start_new_session=True,
        )
        agent: subprocess.Popen[str] | None = None
        try:
            time.sleep(2.0)  # warm-up: imports, page cache
            off1 = (time.monotonic(), time.monotonic() + phase_s)
            time.sleep(phase_s)
            config = root / "agent.toml"
            config.write_text(
                f'server_url = "{server.url}"\n'
                f'enrol_token = "{server.enrol_token("bench")}"\n'
                'name = "bench-host"\n'
                f'data_dir = "{root / "agent"}"\n'
                f"interval_s = {interval_s}\n"
                "tls_verify = false\n"
                "apply_actions = false\n"  # the cost of watching, not of enforcing
                "[[targets]]\n"
                'name = "bench-workload"\n'
                f"pid = {work.pid}\n"
                f"profile_s = {profile_s}\n"
            )
            agent = subprocess.Popen(
                [sys.executable, "-m", "bam", "agent", "run", "--config", str(config), "--json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            assert agent.stdout is not None
            events = _AgentEvents(agent.stdout)
            deadline = time.monotonic() + profile_s + 120
            while "monitoring" not in events.phases:
                if agent.poll() is not None or time.monotonic() > deadline:
                    tail = "\n".join(events.lines[-20:])
                    raise BamError(f"the agent did not reach its monitoring phase:\n{tail}")
                time.sleep(0.2)
            time.sleep(1.0)  # first windows, first evidence
            cpu0, on0 = _proc_cpu_s(agent.pid), time.monotonic()
            rss_peak = 0.0
            while time.monotonic() < on0 + phase_s:
                rss_peak = max(rss_peak, rss_mb(agent.pid))
                time.sleep(0.5)
            on = (on0, time.monotonic())
            agent_cpu = (_proc_cpu_s(agent.pid) - cpu0) / (on[1] - on[0])
            results_on = events.results
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
            events.join(5)
            if events_log is not None:
                events_log.write_text("\n".join(events.lines) + "\n")
            off2 = (time.monotonic() + 1.0, time.monotonic() + 1.0 + phase_s)
            time.sleep(phase_s + 1.0)
        finally:
            if agent is not None and agent.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(agent.pid, signal.SIGKILL)
                agent.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(work.pid, signal.SIGKILL)
            work.wait(10)
            server.stop()
        phases = {
            name: _iterations(log, *span)
            for name, span in (("off_before", off1), ("on", on), ("off_after", off2))
        }
    for name, (wall, _) in phases.items():
        if len(wall) < 10:
            raise BamError(f"phase {name}: only {len(wall)} workload iterations were logged")
    med = {k: statistics.median(w) for k, (w, _) in phases.items()}
    med_cpu = {k: statistics.median(c) for k, (_, c) in phases.items()}
    off = statistics.median(phases["off_before"][0] + phases["off_after"][0])
    off_cpu = statistics.median(phases["off_before"][1] + phases["off_after"][1])
    return {
        "slowdown": round(med["on"] / off, 4),
        "workload_cpu_ratio": round(med_cpu["on"] / off_cpu, 4),
        "off_phases_ratio": round(med["off_after"] / med["off_before"], 4),
        "iteration_ms_median": {k: round(v * 1e3, 3) for k, v in med.items()},
        "iteration_cpu_ms_median": {k: round(v * 1e3, 3) for k, v in med_cpu.items()},
        "iterations": {k: len(w) for k, (w, _) in phases.items()},
        "agent_cpu_fraction": round(agent_cpu, 4),
        "agent_rss_mb_peak": round(rss_peak, 1),
        "evidence_results_while_on": results_on,
        "severity_counts": dict(events.levels),
        "agent_stats": {k: v for k, v in events.stats.items() if k != "type"},
        "phase_s": phase_s,
        "profile_s": profile_s,
        "interval_s": interval_s,
    }


__all__ = ["bench_agent"]
