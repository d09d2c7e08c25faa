"""``bam demo``: the whole loop on a real workload, in a few minutes, on loopback only.

1. an embedded attestation server (SQLite, child process) with the demo policy: the shipped
   default policy with one change — ``high`` behaviour severity isolates (the default only
   investigates at high and isolates at critical); uploaded through the validated policy path;
2. the agent starts the flawed ``notes`` service (:mod:`bam.demo.service`) in its own cgroup
   under the eBPF sensor, while benign traffic runs, and profiles it;
3. benign phase: the same traffic, attested every second — every alert counted;
4. attack: command injection → ``bash`` reverse shell to a loopback listener → the attacker
   runs ``id``, reads ``/etc/passwd`` and a note. The agent reports at once on high/critical,
   the server says isolate, the agent freezes the group and cuts its network, and the demo
   *checks* it: ``cgroup.events`` frozen, the nft table present, the service port no longer
   answers, the attacker's shell no longer answers;
5. everything is undone and removed; a timeline, JSON outcome and an HTML report remain.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bam.actions.process import ProcessActuator, tcp_reachable
from bam.agent.config import AgentSettings, TargetSpec
from bam.agent.embedded import EmbeddedServer
from bam.agent.runner import Agent
from bam.demo.traffic import Attack, BenignTraffic, get, seed_notes
from bam.detect.severity import rank
from bam.errors import BamError
from bam.server.pgtemp import free_port

log = logging.getLogger("bam.demo")

_HIGH = '{"reason": "behavior_severity_high", "status": "contraindicated", "action": "investigate"}'


def demo_policy() -> str:
    """The default policy with high severity → isolate (fails loudly if it cannot be made)."""
    from bam.server.policy import default_source

    src = default_source()
    if _HIGH not in src:
        raise BamError("the default policy changed: cannot derive the demo policy from it")
    return src.replace(_HIGH, _HIGH.replace('"investigate"', '"isolate"'))


class Demo:
    """State of one demo run (events, phases, measurements)."""

    def __init__(
        self,
        *,
        quick: bool = False,
        workdir: Path | None = None,
        report: Path | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.quick = quick
        # too short a profile misses some of the service's normal paths (a benign alert in ~1 of
        # 5 quick runs at 20 s): even the quick run profiles for 35 s
        self.profile_s = 35.0 if quick else 45.0
        self.benign_s = 15.0 if quick else 40.0
        self.say = say
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="bam-demo-")
        self.root = workdir or Path(self._tmp.name if self._tmp else ".")
        self.report_path = report or Path.cwd() / "bam-demo-report.html"
        self.phase = "start"
        self.events: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.workload = "notes"
        """The target's name (the server's workload)."""

    def _on_event(self, e: dict[str, Any]) -> None:
        e = {**e, "demo_phase": self.phase}
        if e["type"] == "tick":
            if e.get("value", 0) or self.phase == "attack":
                self.events.append(e)
            return
        self.events.append(e)
        if e["type"] == "observation":
            sc = e.get("scores") or {}
            self.timeline.append(
                {
                    "t": round(e["t"] - self.t0, 2),
                    "phase": self.phase,
                    "what": "evidence" + (" (urgent)" if e.get("urgent") else ""),
                    "score": sc.get("window_peak"),
                    "severity_value": sc.get("severity_value"),
                    "severity": e.get("severity"),
                    "label": e.get("label"),
                    **(
                        {"top": e.get("top_features", [])[:3]}
                        if e.get("severity") != "none"
                        else {}
                    ),
                }
            )
        elif e["type"] == "result" and self.timeline:
            for row in reversed(self.timeline):
                if row["what"].startswith("evidence") and "decision" not in row:
                    row["decision"] = f"{e.get('status')} / {e.get('action')}"
                    break
        elif e["type"] == "action":
            rec = e.get("record") or {}
            self.timeline.append(
                {
                    "t": round(e["t"] - self.t0, 2),
                    "phase": self.phase,
                    "what": f"action {rec.get('action', e.get('action'))}",
                    "action": rec.get("action", e.get("action")),
                    "verified": e.get("ok"),
                }
            )
        elif e["type"] == "phase":
            self.timeline.append(
                {
                    "t": round(e["t"] - self.t0, 2),
                    "phase": self.phase,
                    "what": f"agent: {e['phase']}",
                }
            )

    # ---------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        t_start = time.monotonic()
        server = EmbeddedServer(self.root, policy_source=demo_policy(), in_process=False)
        self.say("starting the embedded attestation server (SQLite, loopback)…")
        server.start()
        agent: Agent | None = None
        traffic: BenignTraffic | None = None
        attack: Attack | None = None
        try:
            self.say(f"server {server.url}  policy {server.policy_id}")
            self.say(
                f"dashboard (while the demo runs): {server.url}/dashboard  "
                f"(log in with the operator token {server.admin_token})"
            )
            notes = self.root / "notes"
            names = seed_notes(notes)
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            settings = AgentSettings(
                server_url=server.url,
                enrol_token=server.enrol_token("bam demo"),
                name="demo-host",
                data_dir=self.root / "agent",
                interval_s=1.0,
                tls_verify=False,
                targets=[
                    TargetSpec(
                        name="notes",
                        command=[
                            sys.executable,
                            "-m",
                            "bam.demo.service",
                            "--port",
                            str(port),
                            "--data",
                            str(notes),
                        ],
                        profile_s=self.profile_s,
                    )
                ],
            )
            agent = Agent(settings, on_event=self._on_event)
            agent.enrol()
            self.phase = "profile"
            agent.start_targets()
            st = agent.targets["notes"]
            deadline = time.monotonic() + 20
            while True:
                agent.run(duration_s=0.1)
                with contextlib.suppress(OSError):
                    get(base + "/", timeout=0.5)
                    break
                if time.monotonic() > deadline:
                    raise BamError("the demo service did not come up")
            traffic = BenignTraffic(base, names).start()
            self.say(
                f"profiling the notes service (pid {st.monitor.root_pid}) under benign "
                f"traffic for {self.profile_s:.0f} s…"
            )
            cpu_frac, rss, benign_obs, benign_alerts = self.profile_then_benign(agent, st)
            self.phase = "attack"
            attack = Attack(base)
            self.say("ATTACK: command injection → reverse shell to 127.0.0.1:" + str(attack.port))
            attack.launch()
            import threading

            op = threading.Thread(target=attack.operate, kwargs={"timeout_s": 10}, daemon=True)
            op.start()
            isolated = self.wait_isolated(agent, 20.0)
            op.join(timeout=5)
            detect, result = self.detection(), self.contraindicated()
            # ---- checks, read back from the kernel and over the network
            act = st.monitor.actuator
            checks: dict[str, Any] = {}
            if isinstance(act, ProcessActuator) and act.cgroup is not None:
                checks["cgroup_frozen"] = act.cgroup.frozen()
                checks["nft_rule_present"] = act.cut is not None and act.cut.active()
            checks["service_port_unreachable"] = not tcp_reachable("127.0.0.1", port, 1.0)
            checks["attacker_shell_silenced"] = not attack.shell_responds(1.5)
            checks["attacker_had_shell"] = attack.connected_at is not None
            checks["attacker_read_passwd"] = b"root:" in attack.output
            evidence_verified = self._verify_results(server) if result is not None else False
            self.say("isolation checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))
            outcome = {
                **self.detection_outcome(
                    benign_alerts, benign_obs, attack.sent_at, detect, result, isolated
                ),
                "evidence_verified": evidence_verified,
                "action_verified": bool(
                    isolated
                    and isolated.get("ok")
                    and checks.get("cgroup_frozen")
                    and checks.get("nft_rule_present")
                    and checks["service_port_unreachable"]
                    and checks["attacker_shell_silenced"]
                ),
                "checks": checks,
                "agent_cpu_overhead": round(cpu_frac, 4),
                "agent_rss_mb": rss,
                "benign_requests": traffic.requests,
                "dashboard": f"{server.url}/dashboard",
                "sensor": st.monitor.describe_sensor(),
            }
        finally:
            if traffic is not None:
                traffic.close()
            if attack is not None:
                attack.close()
            if agent is not None:
                agent.close()  # undoes the isolation, kills the service, removes the group
            server.stop()
        outcome["duration_s"] = round(time.monotonic() - t_start, 1)
        outcome["report"] = str(self.report_path)
        self.write_report(outcome)
        outcome["timeline"] = self.timeline
        if self._tmp is not None:
            self._tmp.cleanup()
        return outcome

    # ---------------------------------------------------------------- shared with the VM demo
    def profile_then_benign(
        self, agent: Agent, st: Any
    ) -> tuple[float, float, list[dict[str, Any]], int]:
        """Run the agent until profiling ends, then the benign phase (``benign_s``); returns
        the agent's CPU share and peak RSS then, the benign observations and alert count."""
        while st.monitor.phase == "profiling":
            agent.run(duration_s=0.25)
        self.phase = "benign"
        self.say(f"baseline learnt; benign traffic for {self.benign_s:.0f} s (attested every 1 s)…")
        cpu0, wall0 = agent.loop_cpu_s, agent.loop_wall_s
        agent.run(duration_s=self.benign_s)
        cpu_frac = (agent.loop_cpu_s - cpu0) / max(1e-9, agent.loop_wall_s - wall0)
        rss = float(agent.stats()["peak_rss_mb"])
        benign_obs = [
            e for e in self.events if e["type"] == "observation" and e["demo_phase"] == "benign"
        ]
        return cpu_frac, rss, benign_obs, self.benign_alerts()

    @staticmethod
    def detection_outcome(
        benign_alerts: int,
        benign_obs: list[dict[str, Any]],
        sent_at: float,
        detect: dict[str, Any] | None,
        result: dict[str, Any] | None,
        isolated: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The outcome keys both demos report the same way (benign phase, detection, decision)."""
        first = detect.get("first_anomaly_ts") if detect else None
        return {
            "benign_alerts": benign_alerts,
            "benign_evidence": len(benign_obs),
            "attack_detected": detect is not None,
            "detection_latency_s": round(detect["t"] - sent_at, 3) if detect else None,
            "first_anomalous_call_after_exploit_s": round(first - sent_at, 3) if first else None,
            "decision": f"{result.get('status')} / {result.get('action')}" if result else None,
            "action": (isolated.get("record") or {}).get("action") if isolated else None,
        }

    def benign_alerts(self) -> int:
        """Observations >= medium or results not affirming during the benign phase."""
        return sum(
            1
            for e in self.events
            if e["demo_phase"] == "benign"
            and (
                (e["type"] == "observation" and rank(e["severity"]) >= rank("medium"))
                or (e["type"] == "result" and e.get("status") not in ("affirming", None))
            )
        )

    def isolation(self) -> dict[str, Any] | None:
        """The agent's isolate action of the attack phase, if any."""
        return next(
            (
                e
                for e in self.events
                if e["type"] == "action"
                and e["demo_phase"] == "attack"
                and (e.get("record") or {}).get("action") == "isolate"
            ),
            None,
        )

    def wait_isolated(self, agent: Agent, timeout_s: float) -> dict[str, Any] | None:
        """Run the agent until it isolated the workload (or ``timeout_s`` passed)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            agent.run(duration_s=0.1)
            if (found := self.isolation()) is not None:
                return found
        return None

    def detection(self) -> dict[str, Any] | None:
        """The first high/critical observation of the attack phase."""
        return next(
            (
                e
                for e in self.events
                if e["type"] == "observation"
                and e["demo_phase"] == "attack"
                and rank(e["severity"]) >= rank("high")
            ),
            None,
        )

    def contraindicated(self) -> dict[str, Any] | None:
        """The first contraindicated result of the attack phase."""
        return next(
            (
                e
                for e in self.events
                if e["type"] == "result"
                and e["demo_phase"] == "attack"
                and e.get("status") == "contraindicated"
            ),
            None,
        )

    def _verify_results(self, server: EmbeddedServer) -> bool:
        """The server stored the attack evidence and its signed result verifies with its key."""
        from bam.evidence import VerificationKey
        from bam.server.ear import verify_ear

        with server.operator() as op:
            key = VerificationKey.from_jwk(op.get("/v1/server-key")["jwk"])
            results = op.get(f"/v1/workloads/{self.workload}/results", limit=50)["results"]
            rows = op.get(f"/v1/workloads/{self.workload}/evidence", limit=500)["evidence"]
        bad = [r for r in results if r["status"] == "contraindicated"]
        if not bad or not any(r.get("severity") in ("high", "critical") for r in rows):
            return False
        claims = verify_ear(bad[-1]["ear"], key)
        return self.workload in claims.get("submods", {})

    # ---------------------------------------------------------------- report
    def write_report(self, outcome: dict[str, Any]) -> None:
        ticks = [e for e in self.events if e["type"] in ("tick", "observation")]
        pts = [
            (
                e["t"] - self.t0,
                float(e.get("value") or (e.get("scores") or {}).get("severity_value") or 0),
            )
            for e in ticks
        ]
        peaks = [
            (e["t"] - self.t0, float((e.get("scores") or {}).get("window_peak") or 0))
            for e in self.events
            if e["type"] == "observation"
        ]
        self.report_path.write_text(render_html(outcome, self.timeline, pts, peaks))


def render_html(
    outcome: dict[str, Any],
    timeline: list[dict[str, Any]],
    points: list[tuple[float, float]],
    peaks: list[tuple[float, float]] | None = None,
) -> str:
    """A self-contained report (inline SVG, no script, no CDN)."""
    w, h, pad = 900, 260, 40
    tmax = max([p[0] for p in points] + [1.0])
    vmax = max([p[1] for p in points] + [10.0])

    def xy(t: float, v: float) -> str:
        return f"{pad + (w - 2 * pad) * t / tmax:.1f},{h - pad - (h - 2 * pad) * min(v, vmax) / vmax:.1f}"

    dots = "".join(
        f'<circle cx="{xy(t, v).split(",")[0]}" cy="{xy(t, v).split(",")[1]}" r="2.5" '
        f'fill="{"#c0392b" if v >= 4 else "#e67e22" if v >= 1 else "#2c7fb8"}"/>'
        for t, v in points
    )
    for t, v in peaks or []:
        x, y = xy(t, v).split(",")
        dots += f'<rect x="{float(x) - 2:.1f}" y="{float(y) - 2:.1f}" width="4" height="4" fill="#888"/>'
    lines = ""
    for lvl, v in (("high", 4.0), ("critical", 8.0)):
        y = xy(0, v).split(",")[1]
        lines += (
            f'<line x1="{pad}" x2="{w - pad}" y1="{y}" y2="{y}" stroke="#999" stroke-dasharray="4"/>'
            f'<text x="{w - pad + 2}" y="{y}" font-size="10">{lvl}</text>'
        )
    marks = ""
    for row in timeline:
        if row["what"].startswith(("agent:", "action")):
            x = xy(row["t"], 0).split(",")[0]
            marks += (
                f'<line x1="{x}" x2="{x}" y1="{pad}" y2="{h - pad}" stroke="#555"/>'
                f'<text x="{x}" y="{pad - 4}" font-size="10">{html.escape(row["what"])}</text>'
            )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">'
        f'<rect width="{w}" height="{h}" fill="white"/>{lines}{marks}{dots}'
        f'<text x="{pad}" y="{h - 8}" font-size="11">time since start (s) → ; y: severity '
        "(magnitude × frequency, dots); grey squares: peak window score per evidence (× threshold)</text></svg>"
    )
    cols = [
        "t",
        "phase",
        "what",
        "score",
        "severity_value",
        "severity",
        "label",
        "decision",
        "action",
        "verified",
        "top",
    ]
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
        for r in timeline
    )
    summary = html.escape(json.dumps(outcome, indent=2, default=str))
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>BAM demo report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px "
        "solid #ddd;font-size:13px}</style></head><body><h1>BAM live demo</h1>"
        f"<h2>Outcome</h2><pre>{summary}</pre><h2>Severity over time</h2>{svg}"
        "<h2>Timeline</h2><table><tr>"
        + "".join(f"<th>{c}</th>" for c in cols)
        + f"</tr>{rows}</table></body></html>"
    )
