"""The agent daemon: enrol, watch every target, attest on schedule and at once on alarm, enforce.

One thread, one loop (``tick_s``, 0.2 s by default): each target's sensor batch is scored
(:mod:`bam.agent.monitor`); every ``interval_s``, and immediately when a target's severity
reaches high/critical, the target's observation is put in the spool; the spool is delivered
(:mod:`bam.agent.delivery`); the action in each result is applied to its target and reported
back to the server. A server outage only stops delivery: monitoring and spooling go on.

Enforcement follows the result, with one rule of its own: an isolation is undone only by an
``allow`` result, which the server gives only after an operator acknowledged the hold.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bam.actions.cgroup import ActionError
from bam.actions.process import ActionRecord
from bam.actions.vm import VmActionRecord
from bam.agent.config import AgentSettings, TargetSpec
from bam.agent.delivery import Delivered, Delivery
from bam.agent.monitor import TargetMonitor
from bam.agent.spool import Spool, SpoolChain
from bam.agent.stream import self_cpu_s
from bam.detect.severity import rank
from bam.errors import BamError
from bam.evidence.keys.software import SoftwareKeyStore
from bam.evidence.token import EvidenceBuilder
from bam.server.client import AgentClient, ApiError

log = logging.getLogger("bam.agent")

Event = dict[str, Any]


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (default: this one) now, MiB, from ``/proc/PID/status``."""
    try:
        for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: SIM115
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class TargetState:
    monitor: TargetMonitor
    last_report: float = 0.0
    last_urgent: float = 0.0
    reported_rank: int = 0
    applied: str = "allow"
    pending_features: list[str] = field(default_factory=list)
    ended: bool = False


class Agent:
    """``Agent(settings).run(stop_event)``; :meth:`close` always leaves nothing behind."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        on_event: Callable[[Event], None] | None = None,
        stdout: int | None = None,
        stop_commands_on_close: bool = True,
    ) -> None:
        self.settings = settings
        self.on_event = on_event or (lambda e: None)
        self.stdout = stdout
        self.stop_commands_on_close = stop_commands_on_close
        d = settings.data_dir
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.signer = SoftwareKeyStore(d / "keys").load_or_create()
        self.spool = Spool(d / "spool.db", max_pending=settings.spool_max)
        self.chain = SpoolChain(self.spool)
        self.builder = EvidenceBuilder(self.signer, chain=self.chain)
        self.client = AgentClient(
            settings.server_url,
            self.signer,
            verify=settings.tls_verify,
            timeout=settings.request_timeout_s,
        )
        self.delivery = Delivery(
            self.spool, self.client, self.builder, batch_max=settings.batch_max
        )
        self.targets: dict[str, TargetState] = {}
        self.last_action_id = int(self.spool.get_meta("last_action_id", "0") or 0)
        self.cpu0 = self_cpu_s()
        self.t0 = time.monotonic()
        self.peak_rss_mb = 0.0
        self.actions: list[ActionRecord | VmActionRecord] = []
        self.loop_cpu_s = 0.0
        """CPU time of the agent's own loop thread (sensor drain, scoring, signing, sending):
        what the agent costs, without whatever else shares the process (a demo's traffic)."""
        self.loop_wall_s = 0.0

    # ---------------------------------------------------------------- setup
    def _emit(self, **event: Any) -> None:
        event.setdefault("t", time.time())
        with contextlib.suppress(Exception):
            self.on_event(event)

    def enrol(self, stop: threading.Event | None = None, timeout_s: float = 60.0) -> None:
        """Enrol once (the key is pinned by the server), register every target."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.spool.get_meta("enrolled") != self.settings.server_url:
                    token = self.settings.enrol_token
                    if not token:
                        raise BamError(
                            "the agent is not enrolled with "
                            f"{self.settings.server_url}: give an enrolment token "
                            "(BAM_AGENT_ENROL_TOKEN or enrol_token in the config)"
                        )
                    out = self.client.enrol(token, self.settings.name)
                    self.spool.set_meta("enrolled", self.settings.server_url)
                    self.spool.set_meta("agent_id", str(out.get("agent_id", "")))
                    log.info("enrolled with %s as %s", self.settings.server_url, self.settings.name)
                for spec in self.settings.targets:
                    # the server's staleness clock has a 1 s floor
                    interval = max(1.0, spec.interval_s or self.settings.interval_s)
                    self.client.register_workload(spec.name, spec.kind, interval)
                return
            except httpx.TransportError as e:
                if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                    raise BamError(f"server {self.settings.server_url} unreachable: {e}") from None
                time.sleep(0.5)

    def start_targets(self, specs: list[TargetSpec] | None = None) -> None:
        for spec in specs if specs is not None else self.settings.targets:
            status = self.spool.get_meta(f"status:{spec.name}")
            mon = TargetMonitor(
                spec,
                self.settings.data_dir,
                backend=self.settings.backend,
                open_alert=status == "contraindicated",
                stdout=self.stdout,
            )
            self.targets[spec.name] = TargetState(mon)
            try:
                mon.start()
            except BaseException:
                mon.close(stop_command=True)
                del self.targets[spec.name]
                raise
            self._emit(type="phase", workload=spec.name, phase=mon.phase)

    # ---------------------------------------------------------------- loop
    def step(self) -> list[Delivered]:
        """One tick of every target, reports due, delivery, actions."""
        now = time.monotonic()
        for name, st in self.targets.items():
            if st.ended:
                continue
            mon = st.monitor
            before = mon.phase
            tick = mon.tick()
            if mon.phase != before:
                self._emit(type="phase", workload=name, phase=mon.phase)
            self._emit(
                type="tick",
                workload=name,
                phase=tick.phase,
                calls=tick.calls,
                peak=tick.peak,
                value=tick.value,
                level=tick.level,
            )
            if mon.phase != "monitoring":
                continue
            interval = mon.spec.interval_s or self.settings.interval_s
            if st.last_report == 0.0:
                st.last_report = now
            due = now - st.last_report >= interval
            urgent = (
                tick.urgent
                and now - st.last_urgent >= self.settings.urgent_min_gap_s
                and (rank(tick.level) > st.reported_rank or now - st.last_urgent >= 2.0)
            )
            alive = mon.alive()
            if due or urgent or not alive:
                obs = mon.observation(st.pending_features)
                st.pending_features = []
                sev = obs["behavior"]["severity"]
                self.spool.push(name, sev, obs)
                st.last_report = now
                st.reported_rank = rank(sev)
                if urgent:
                    st.last_urgent = now
                self._emit(
                    type="observation",
                    workload=name,
                    severity=sev,
                    urgent=urgent,
                    first_anomaly_ts=obs.get("first_anomaly_ts"),
                    scores=obs["behavior"]["scores"],
                    label=obs["behavior"].get("label"),
                    top_features=obs["behavior"].get("top_features", []),
                )
            if not alive:
                st.ended = True
                self._emit(type="ended", workload=name)
        delivered = self.delivery.pump(budget_s=max(0.05, self.settings.tick_s))
        for d in delivered:
            self._handle(d)
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb())
        return delivered

    def _handle(self, d: Delivered) -> None:
        self._emit(
            type="result",
            workload=d.workload,
            seq=d.seq,
            ok=d.ok,
            status=d.status,
            action=d.action,
            reasons=d.reasons,
            severity=(d.payload.get("behavior") or {}).get("severity"),
            error=d.error,
        )
        if not d.ok or d.workload not in self.targets:
            return
        if d.status:
            self.spool.set_meta(f"status:{d.workload}", d.status)
        if self.settings.apply_actions and d.action:
            self.enforce(d.workload, d.action, d.reasons)

    def enforce(
        self, workload: str, action: str, reasons: list[str]
    ) -> ActionRecord | VmActionRecord | None:
        """Apply ``action`` if it changes what is in force (never re-freezes every result)."""
        st = self.targets[workload]
        act = st.monitor.actuator
        if act is None:
            return None
        rec: ActionRecord | VmActionRecord | None = None
        try:
            if action == st.applied and action != "investigate":
                return None
            if action == "allow" and st.applied == "isolate":
                rec = act.release()
            elif action == "investigate" and st.applied == "investigate":
                return None
            elif action in ("allow", "monitor") and st.applied not in ("isolate", "terminate"):
                rec = act.apply(action, reasons)
            elif st.applied == "terminate":
                return None
            else:
                rec = act.apply(action, reasons)
        except ActionError as e:
            log.error("%s: action %s failed: %s", workload, action, e)
            self._emit(type="action", workload=workload, action=action, ok=False, error=str(e))
            return None
        st.applied = "allow" if rec.action == "release" else rec.action
        if rec.action == "investigate" and "manifest_sha256" in rec.details:
            st.pending_features.append(f"snapshot_sha256={rec.details['manifest_sha256']}")
        self.actions.append(rec)
        self._emit(type="action", workload=workload, record=rec.as_dict(), ok=rec.verified)
        self._report_action(workload, rec)
        return rec

    def _report_action(self, workload: str, rec: ActionRecord | VmActionRecord) -> None:
        """Tell the server what was done (``POST /v1/actions/{id}/report``)."""
        try:
            rows = self.client.actions(after=self.last_action_id, wait=0)
        except (httpx.TransportError, ApiError) as e:
            log.info("could not fetch actions to report (%s)", e)
            return
        for row in rows:
            aid = int(row.get("id", 0))
            self.last_action_id = max(self.last_action_id, aid)
            if row.get("workload") == workload:
                with contextlib.suppress(httpx.TransportError, ApiError):
                    self.client.report(
                        aid,
                        "done" if rec.verified else "failed",
                        f"{rec.action}: verified={rec.verified} {rec.details}"[:500],
                    )
        self.spool.set_meta("last_action_id", str(self.last_action_id))

    def run(self, stop: threading.Event | None = None, duration_s: float | None = None) -> None:
        """Loop until ``stop`` is set, ``duration_s`` passed, or every target ended."""
        c0, w0 = time.thread_time(), time.monotonic()
        try:
            self._run(stop, duration_s)
        finally:
            self.loop_cpu_s += time.thread_time() - c0
            self.loop_wall_s += time.monotonic() - w0

    def _run(self, stop: threading.Event | None, duration_s: float | None) -> None:
        end = None if duration_s is None else time.monotonic() + duration_s
        tick = self.settings.tick_s
        while not (stop is not None and stop.is_set()):
            t = time.monotonic()
            if end is not None and t >= end:
                break
            for st in self.targets.values():
                if st.monitor.sensor is not None:
                    st.monitor.sensor.poll()
            self.step()
            if self.targets and all(s.ended for s in self.targets.values()):
                self.delivery.pump(budget_s=2.0)
                break
            # drain the sensors' rings every 20 ms between ticks (the rings are small)
            while (left := tick - (time.monotonic() - t)) > 0:
                if stop is not None and stop.wait(min(left, 0.02)):
                    break
                if stop is None:
                    time.sleep(min(left, 0.02))
                for st in self.targets.values():
                    if st.monitor.sensor is not None and not st.ended:
                        st.monitor.sensor.poll()

    # ---------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        cpu = self_cpu_s() - self.cpu0
        return {
            "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3),
            "cpu_fraction": round(cpu / wall, 4) if wall > 0 else 0.0,
            "loop_cpu_s": round(self.loop_cpu_s, 3),
            "loop_cpu_fraction": round(self.loop_cpu_s / self.loop_wall_s, 4)
            if self.loop_wall_s > 0
            else 0.0,
            "rss_mb": round(rss_mb(), 1),
            "peak_rss_mb": round(max(self.peak_rss_mb, rss_mb()), 1),
            "spool_pending": self.spool.pending_count(),
            "spool_dropped": int(self.spool.get_meta("dropped", "0") or 0),
            "chain_seq": self.spool.chain_state().seq,
            "server_up": self.delivery.server_up,
            "blocked": self.delivery.blocked,
        }

    def close(self) -> None:
        for st in self.targets.values():
            with contextlib.suppress(Exception):
                st.monitor.close(stop_command=self.stop_commands_on_close)
        self.client.close()
        self.spool.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
