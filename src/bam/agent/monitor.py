"""One target of the agent: start or attach, profile (or load a baseline), then monitor.

Phases: ``profiling`` (collect the workload's calls for ``profile_s``, fit a
:class:`~bam.detect.Baseline` on time slices of it, save it so a restart does not profile
again), then ``monitoring`` (each tick: sensor batch → :class:`WindowScorer` →
:class:`~bam.detect.SeverityTracker`; each reporting interval one *observation*: the
behaviour summary and measurements that the runner spools and attests).

A command the agent starts runs inside its own cgroup v2 group from its first instruction
(moved there while still held before ``exec``), so the actions can freeze it and cut the
network of every socket it ever opens. After an agent restart, a group that still has
processes is watched as it is instead of starting the command a second time.

A QEMU VM (``qmp``) is watched through its guest's syscall stream and the QEMU process's
host-side resources (:mod:`bam.agent.vm`); its actions go over QMP (:class:`VmActuator`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import numpy.typing as npt

from bam.actions.cgroup import Cgroup, safe_name, v2_root
from bam.actions.process import ProcessActuator
from bam.actions.vm import VmActuator
from bam.agent.config import TargetSpec
from bam.agent.fit import fit_in_child, write_profile
from bam.agent.resources import ProcessResources, RateProfile
from bam.agent.stream import LiveSensor, WindowScorer
from bam.agent.vm import VmLiveSensor, VmResources, vm_info
from bam.detect import Baseline, SeverityTracker, level_of
from bam.detect.severity import ExcessFrequency, rank
from bam.errors import BamError
from bam.events import SyscallBatch
from bam.evidence.claims import (
    BehaviorCounts,
    BehaviorSummary,
    Measurements,
    ModelMeasurement,
    Severity,
)
from bam.evidence.claims import Target as TargetClaim
from bam.evidence.errors import MeasurementError
from bam.evidence.measure import (
    collect_measurements,
    measure_model,
    measure_process,
    measure_vm,
)
from bam.sensors.errors import SensorError
from bam.sensors.vm.launch import VmInfo
from bam.sensors.vm.qmp import Qmp
from bam.sensors.workload import GatedCommand, Target

if TYPE_CHECKING:
    from bam.models.classifier import AttackClassifier

log = logging.getLogger("bam.agent")

Phase = Literal["starting", "profiling", "monitoring", "stopped"]
RAW = np.dtype([("ts", "<f8"), ("tid", "<i4"), ("sid", "<i4")])


class ProfileRefusedError(BamError):
    """Profiling was refused (the workload is under an open alert)."""


@dataclass
class Interval:
    """Accumulated over one reporting interval."""

    start: float = 0.0
    end: float = 0.0
    calls: int = 0
    windows: int = 0
    anomalous: int = 0
    peak: float = 0.0
    peak_value: float = 0.0
    peak_segment: Any = None
    forks: int = 0
    execs: int = 0
    listens: int = 0
    mprotects: int = 0
    first_anomaly_ts: float | None = None
    dropped: int = 0
    """Events the sensor lost: no window spans them (the scorer's context is reset)."""
    digest: Any = field(default_factory=hashlib.sha256)


@dataclass
class Tick:
    """What the runner needs to know after one tick."""

    phase: Phase
    calls: int = 0
    peak: float = 0.0
    value: float = 0.0
    level: str = "none"
    urgent: bool = False
    first_anomaly_ts: float | None = None


class TargetMonitor:
    """Profiling + monitoring of one configured target."""

    def __init__(
        self,
        spec: TargetSpec,
        data_dir: Path,
        *,
        backend: str = "auto",
        open_alert: bool = False,
        stdout: int | None = None,
    ) -> None:
        self.spec = spec
        self.data_dir = data_dir
        self.backend = backend
        self.open_alert = open_alert
        self.stdout = stdout
        self.phase: Phase = "starting"
        self.command: GatedCommand | None = None
        self.target: Target | None = None
        self.root_pid: int | None = None
        self.sensor: LiveSensor | VmLiveSensor | None = None
        self.actuator: ProcessActuator | VmActuator | None = None
        self.qmp: Qmp | None = None
        self.vm: VmInfo | None = None
        self.resources: RateProfile | None = None
        self.baseline: Baseline | None = None
        self.baseline_path = (
            spec.baseline or data_dir / "baselines" / f"{safe_name(spec.name)}.bamb"
        )
        self.scorer: WindowScorer | None = None
        # one tracker per thread: the frequency of anomalous windows is counted in each
        # thread's own horizon, so a busy normal thread (the service's main loop) does not
        # decay away the run of anomalous windows of an attacker's shell
        self.trackers: dict[int, SeverityTracker] = {}
        # ... and one over the whole workload, decayed in *time* (horizon_s): an attack spreads
        # over many short-lived processes (the shell, then one per command), each with too few
        # windows for its own tracker to escalate quickly
        self.wfreq = ExcessFrequency(horizon_s=spec.horizon_s, far=spec.target_far)
        self.interval = Interval(start=time.time())
        self._profile: list[SyscallBatch] = []
        self._profile_until = 0.0
        self.raw_dir = data_dir / "raw" / safe_name(spec.name)
        self._raw_file: Any = None
        self._raw_path: Path | None = None
        self._models: list[ModelMeasurement] = []
        self.classifier: AttackClassifier | None = None
        self.level = "none"
        self.last_value = 0.0

    # ---------------------------------------------------------------- start
    def start(self) -> None:
        spec = self.spec
        cg: Cgroup | None = None
        if spec.command:
            if v2_root() is not None:
                cg = Cgroup.create(spec.name)
            if cg is not None and cg.pids():
                log.warning(
                    "%s: group %s still has processes %s (agent restart?): watching them",
                    spec.name,
                    cg.path,
                    cg.pids(),
                )
                self.target = Target.from_cgroup(cg.path)
                self.root_pid = min(cg.pids())
                self.sensor = LiveSensor(self.target, backend=self.backend)
                self.sensor.start()
            else:
                cmd = GatedCommand(spec.command, stdout=self.stdout, stderr=self.stdout)
                self.command = cmd
                try:
                    if cg is not None:
                        cg.adopt([cmd.pid])  # held before exec: no socket exists yet
                    self.target = cmd.target()
                    self.root_pid = cmd.pid
                    self.sensor = LiveSensor(self.target, backend=self.backend, trim_tid=cmd.pid)
                    self.sensor.start()
                except BaseException:
                    cmd.kill()
                    raise
                cmd.release()
            self.actuator = ProcessActuator(
                spec.name,
                [self.root_pid] if self.root_pid else [],
                cgroup=cg,
                owns_cgroup=True,
                snapshot_dir=self.data_dir / "snapshots" / safe_name(spec.name),
                use_cgroup=cg is not None,
            )
        elif spec.pid is not None:
            self.target = Target.from_pids([spec.pid], label=spec.name)
            self.root_pid = spec.pid
            self.sensor = LiveSensor(self.target, backend=self.backend)
            self.sensor.start()
            self.actuator = ProcessActuator(
                spec.name,
                [spec.pid],
                snapshot_dir=self.data_dir / "snapshots" / safe_name(spec.name),
            )
        elif spec.qmp is not None:
            self._start_vm(spec.qmp)
        elif spec.cgroup is not None:
            self.target = Target.from_cgroup(spec.cgroup)
            pids = self.target.cgroup_pids()
            self.root_pid = min(pids) if pids else None
            self.sensor = LiveSensor(self.target, backend=self.backend)
            self.sensor.start()
            own = (
                Cgroup(self.target.cgroup) if self.target.cgroup_v2 and self.target.cgroup else None
            )
            self.actuator = ProcessActuator(
                spec.name,
                [],
                cgroup=own,
                snapshot_dir=self.data_dir / "snapshots" / safe_name(spec.name),
                use_cgroup=own is not None,
            )
        else:
            raise BamError(f"target {spec.name!r}: give one of command, pid, cgroup, qmp")
        if self.resources is None and self.target is not None:
            try:
                self.resources = ProcessResources(self.target, hz=spec.resource_hz)
            except (SensorError, OSError) as e:
                log.warning("%s: no resource sampling: %s", spec.name, e)
        log.info("%s: watching %s with %s", spec.name, self.label, self.describe_sensor())
        self._load_or_profile()

    def _start_vm(self, qmp_path: Path) -> None:
        """Attach to a running VM: QMP session, guest syscall stream, host-side resources."""
        spec = self.spec
        info = vm_info(qmp_path, spec.vm_trace)
        try:
            self.qmp = Qmp(info.qmp)
        except SensorError as e:
            raise BamError(f"target {spec.name!r}: {e}") from None
        pid = self.qmp.qemu_pid()
        if pid is None:
            raise BamError(f"target {spec.name!r}: cannot tell the QEMU pid behind {info.qmp}")
        info.pid = pid
        self.vm = info
        self.root_pid = pid
        self.resources = VmResources(self.qmp, pid, hz=spec.vm_resource_hz)
        self.sensor = VmLiveSensor(info)
        try:
            self.sensor.start()
        except SensorError as e:
            raise BamError(f"target {spec.name!r}: guest syscall stream: {e}") from None
        self.actuator = VmActuator(
            spec.name, self.qmp, snapshot_dir=self.data_dir / "snapshots" / safe_name(spec.name)
        )

    @property
    def label(self) -> str:
        if self.vm is not None:
            return f"vm:{self.vm.qmp} (QEMU pid {self.vm.pid})"
        return self.target.label if self.target is not None else self.spec.name

    def describe_sensor(self) -> str:
        if isinstance(self.sensor, VmLiveSensor):
            return self.sensor.describe()
        return self.sensor.choice.describe() if self.sensor is not None else "no sensor"

    @property
    def resources_path(self) -> Path:
        return self.baseline_path.with_suffix(".host.json")

    def _load_or_profile(self) -> None:
        if self.baseline_path.exists() and not self.spec.reprofile:
            self.baseline = Baseline.load(self.baseline_path)
            log.info("%s: baseline %s loaded", self.spec.name, self.baseline.model_id_)
            if self.resources is not None and not self.resources.load(self.resources_path):
                log.warning("%s: no host-side resource profile beside the baseline", self.spec.name)
            self._monitoring()
            return
        if self.open_alert:
            raise ProfileRefusedError(
                f"{self.spec.name}: refusing to profile while the workload is under an open "
                "alert (a baseline learnt now could learn the attack); acknowledge it first"
            )
        self.phase = "profiling"
        self._profile_until = time.monotonic() + self.spec.profile_s
        if self.resources is not None:
            self.resources.learning = True
        log.info("%s: profiling for %.0f s", self.spec.name, self.spec.profile_s)

    def end_profiling_soon(self) -> None:
        """Stop profiling at the next tick ("profile until told"), whatever ``profile_s`` says."""
        if self.phase == "profiling":
            self._profile_until = 0.0

    def finish_profiling(self) -> None:
        """Fit on what was collected (time slices become the baseline's traces)."""
        batch = SyscallBatch.concat(self._profile)
        self._profile = []
        if len(batch) < 4 * self.spec.window:
            raise BamError(
                f"{self.spec.name}: only {len(batch)} system calls in {self.spec.profile_s:.0f} s "
                "of profiling: too few to learn from (give the workload some load)"
            )
        # Fitted in a child process (bam.agent.fit): the fit's transient heap would otherwise
        # stay in this long-running agent's resident memory.
        profile = self.baseline_path.with_suffix(".profile.npz")
        try:
            write_profile(profile, batch, self.spec.profile_slices)
            fit_in_child(
                profile,
                self.baseline_path,
                model=self.spec.model,
                window=self.spec.window,
                target_far=self.spec.target_far,
                holdout=self.spec.holdout,
                while_waiting=self.sensor.poll if self.sensor is not None else None,
            )
        finally:
            profile.unlink(missing_ok=True)
        b = Baseline.load(self.baseline_path)
        mid = str(b.model_id_)
        log.info("%s: baseline %s fitted on %d calls", self.spec.name, mid, len(batch))
        if self.resources is not None:
            prof = self.resources.learn()
            self.resources.save(self.resources_path)
            log.info("%s: host-side resource profile (max) %s", self.spec.name, prof)
        self.baseline = b
        self._monitoring()
        assert self.scorer is not None
        self.scorer.seed(batch)

    def _monitoring(self) -> None:
        assert self.baseline is not None
        self.scorer = WindowScorer(self.baseline)
        mid = str(self.baseline.model_id_)
        self._models = [measure_model(mid, [self.baseline_path], "baseline")]
        if self.spec.classifier is not None:
            from bam.models.classifier import AttackClassifier

            self.classifier = AttackClassifier.load(
                self.spec.classifier, expect_model_id=self.spec.classifier_id
            )
            self._models.append(
                measure_model(str(self.classifier.model_id_), [self.spec.classifier], "classifier")
            )
        self.phase = "monitoring"
        self.interval = Interval(start=time.time())
        self._open_raw()

    # ---------------------------------------------------------------- ticks
    def alive(self) -> bool:
        if self.vm is not None:
            return _running(self.vm.pid)
        if self.command is not None and self.command.poll() is not None:
            return False
        return self.target.alive() if self.target is not None else False

    def tick(self) -> Tick:
        """Take what the sensor has, score it, update severity (call every ~0.1-0.25 s)."""
        if self.sensor is None or self.phase in ("starting", "stopped"):
            return Tick(self.phase)
        if self.resources is not None:
            self.resources.maybe_sample()
        batch = self.sensor.take()
        if self.phase == "profiling":
            if len(batch):
                self._profile.append(batch)
            if time.monotonic() >= self._profile_until:
                self.finish_profiling()
            return Tick("profiling", calls=len(batch))
        assert self.scorer is not None
        iv = self.interval
        if len(batch) == 0:
            # decay still applies as time passes without anomalous windows
            return Tick("monitoring", level=self.level, value=self.last_value)
        dropped = self.sensor.take_dropped()
        if dropped:
            # the stream has a hole: a window across it would be scored as if the calls on
            # either side were adjacent, so every thread starts afresh after it
            iv.dropped += dropped
            self.scorer.reset()
            log.warning("%s: the sensor lost %d events; windows restart", self.spec.name, dropped)
        self._write_raw(batch)
        up = self.scorer.feed(batch)
        iv.calls += up.calls
        iv.end = max(iv.end, up.t_end)
        iv.forks += up.forks
        iv.execs += up.execs
        iv.listens += up.listens
        iv.mprotects += up.mprotects
        peak_value = 0.0
        for tid, mags in up.per_thread:
            tr = self.trackers.get(tid)
            if tr is None:
                tr = self.trackers[tid] = SeverityTracker(decay=self.spec.decay)
            for m in mags.tolist():
                v, _ = tr.update(m)
                peak_value = max(peak_value, v)
        over = up.magnitudes[up.magnitudes > 1.0]
        excess = self.wfreq.update(time.monotonic(), len(up.magnitudes), len(over))
        if len(over) and excess > 0:
            peak_value = max(peak_value, float(over.max()) * excess)
        if len(self.trackers) > 4 * len(self.scorer.tails) + 64:
            self.trackers = {t: k for t, k in self.trackers.items() if t in self.scorer.tails}
        iv.windows += len(up.magnitudes)
        iv.anomalous += int((up.magnitudes > 1.0).sum())
        if up.peak > iv.peak:
            iv.peak = up.peak
            iv.peak_segment = up.peak_segment
        if up.first_anomaly_ts is not None and iv.first_anomaly_ts is None:
            iv.first_anomaly_ts = up.first_anomaly_ts
        iv.peak_value = max(iv.peak_value, peak_value)
        level = level_of(peak_value) if peak_value > 0 else "none"
        self.level, self.last_value = level, peak_value
        return Tick(
            "monitoring",
            calls=up.calls,
            peak=up.peak,
            value=peak_value,
            level=level,
            urgent=rank(level) >= rank("high"),
            first_anomaly_ts=up.first_anomaly_ts,
        )

    # ---------------------------------------------------------------- raw log
    def _open_raw(self) -> None:
        self.raw_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._raw_path = self.raw_dir / f"{time.time():.3f}.raw"
        self._raw_file = open(self._raw_path, "wb")  # noqa: SIM115  (closed at rotation)
        self.interval.digest = hashlib.sha256()

    def _write_raw(self, batch: SyscallBatch) -> None:
        rec = np.empty(len(batch), dtype=RAW)
        rec["ts"], rec["tid"], rec["sid"] = batch.ts, batch.tid, batch.sid
        data = rec.tobytes()
        if self._raw_file is not None:
            self._raw_file.write(data)
        self.interval.digest.update(data)

    def _rotate_raw(self) -> None:
        if self._raw_file is not None:
            self._raw_file.close()
        files = sorted(self.raw_dir.glob("*.raw"))
        for f in files[: max(0, len(files) - self.spec.keep_raw_logs + 1)]:
            with contextlib.suppress(OSError):
                f.unlink()
        self._open_raw()

    # ---------------------------------------------------------------- observation
    def measurements(self) -> Measurements:
        proc = None
        if self.root_pid is not None:
            with contextlib.suppress(MeasurementError):
                proc = measure_process(self.root_pid)
        files = []
        if self.vm is not None:
            # what boots: the guest kernel and initrd from QEMU's command line (not the
            # disks, which the guest writes)
            boot = _qemu_boot_files(self.vm.pid)
            with contextlib.suppress(MeasurementError):
                files = measure_vm(
                    kernel=boot.get("-kernel"),
                    initrd=boot.get("-initrd"),
                    firmware=[boot["-bios"]] if "-bios" in boot else [],
                )
        return collect_measurements(
            TargetClaim(
                kind="vm" if self.vm is not None else "process",
                name=self.spec.name,
                pid=self.root_pid,
            ),
            process=proc,
            files=files,
            models=self._models,
        )

    def _classify(self, segment: npt.NDArray[np.int32], fallback: str) -> tuple[str, float]:
        """What the worst window looks like: the classifier's family and P(attack), or
        ``fallback`` (the rule's label) when it finds the window benign-looking."""
        assert self.classifier is not None
        clf = self.classifier
        probas = clf.predict_proba([segment])
        p_attack = float(clf.attack_probability(probas)[0])
        proba = probas[0]
        k = int(proba.argmax())
        if clf.classes_[k] == clf.benign_label or p_attack < 0.5:
            return fallback, round(p_attack, 4)
        return clf.classes_[k], round(float(proba[k]), 4)

    def observation(self, extra_features: list[str] | None = None) -> dict[str, Any]:
        """Close the interval: its behaviour summary + measurements, as JSON-able claims."""
        assert self.baseline is not None
        iv = self.interval
        now = time.time()
        end = max(iv.end, iv.start, now if iv.calls == 0 else iv.end)
        sev = level_of(iv.peak_value) if iv.peak_value > 0 else "none"
        top: list[str] = []
        if iv.peak > 1.0 and iv.peak_segment is not None and len(iv.peak_segment):
            with contextlib.suppress(Exception):
                top = [
                    f"{c.feature} ({c.score:.2f})"[:256]
                    for c in self.baseline.detector.explain(iv.peak_segment, 5)
                ]
        host: dict[str, float] = {}
        if self.resources is not None:
            host, host_top = self.resources.summary()
            top += host_top
        top += list(extra_features or [])
        label: str | None = None
        probability: float | None = None
        if rank(sev) >= rank("medium"):
            label = "unexpected_exec" if iv.execs else "anomalous_sequence"
            if self.classifier is not None and iv.peak_segment is not None:
                label, probability = self._classify(iv.peak_segment, label)
        behavior = BehaviorSummary(
            window_start=round(iv.start, 6),
            window_end=round(end, 6),
            baseline_id=str(self.baseline.model_id_),
            scores={
                "window_peak": round(float(iv.peak), 6),
                "severity_value": round(float(iv.peak_value), 6),
                "anomalous_windows": float(iv.anomalous),
                "windows": float(iv.windows),
                "calls": float(iv.calls),
                "dropped_events": float(iv.dropped),
                **host,
            },
            thresholds={"window": 1.0, "severity_alert": 4.0},
            severity=cast(Severity, sev),
            label=label,
            probability=probability,
            top_features=top,
            counts=BehaviorCounts(
                new_processes=iv.forks, new_listening_ports=iv.listens, exec_mappings=iv.mprotects
            ),
            raw_log_sha256=iv.digest.hexdigest(),
        )
        ms = self.measurements()
        self._rotate_raw()
        self.interval = Interval(start=end)
        return {
            "behavior": behavior.model_dump(mode="json", exclude_none=True),
            "measurements": ms.model_dump(mode="json", exclude_none=True),
            "first_anomaly_ts": iv.first_anomaly_ts,
        }

    # ---------------------------------------------------------------- stop
    def close(self, stop_command: bool = True) -> None:
        """Detach the sensor, undo actions, stop a command we started (if asked)."""
        if self.sensor is not None:
            with contextlib.suppress(Exception):
                self.sensor.close()
        if self._raw_file is not None:
            self._raw_file.close()
            self._raw_file = None
        act = self.actuator
        if (
            stop_command
            and isinstance(act, ProcessActuator)
            and act.cgroup is not None
            and self.spec.command
        ):
            with contextlib.suppress(Exception):
                act.cgroup.kill()
        if self.command is not None and stop_command:
            with contextlib.suppress(Exception):
                self.command.kill()
        if self.actuator is not None:
            self.actuator.close()
        if self.qmp is not None:
            self.qmp.close()
        if self.resources is not None:
            with contextlib.suppress(Exception):
                self.resources.close()
        self.phase = "stopped"


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie is not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _qemu_boot_files(pid: int) -> dict[str, str]:
    """``-kernel``/``-initrd`` (and ``-bios``) of a QEMU process, from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for flag, value in itertools.pairwise(argv):
        f = flag.decode(errors="replace")
        if f in ("-kernel", "-initrd", "-bios"):
            out[f] = value.decode(errors="replace")
    return out
