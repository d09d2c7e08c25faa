"""Record a workload's system calls with the best (or a chosen) backend.

The library side of ``bam record``: one function for a command BAM starts, one for running
processes or a cgroup. Both return a :class:`Recorded` that says which backend ran, what it
captured, what it lost, and turns into a :class:`~bam.events.Trace` for
:func:`bam.traces.recording.write_recording`.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from bam.events import Trace
from bam.sensors.capture import Capture
from bam.sensors.errors import SensorError
from bam.sensors.select import Choice, choose
from bam.sensors.workload import GatedCommand, Target


@dataclass
class Recorded:
    """A finished recording: the capture, the backend choice, the command's exit status."""

    capture: Capture
    choice: Choice
    exit_code: int | None = None
    command: list[str] | None = None
    target: str = ""

    def to_trace(self, name: str, label: str | None = None) -> Trace:
        tr = self.capture.to_trace(name, command=self.command, label=label)
        meta = dict(tr.meta)
        meta["backend_choice"] = self.choice.describe()
        meta["target"] = self.target
        if self.exit_code is not None:
            meta["exit_code"] = self.exit_code
        tr.meta = meta
        return tr

    def summary(self) -> dict[str, Any]:
        c = self.capture
        return {
            "backend": c.backend,
            "backend_choice": self.choice.describe(),
            "target": self.target,
            "events": len(c),
            "seen": c.seen,
            "drops": c.drops,
            "complete": c.complete,
            "threads": len({int(t) for t in set(c.events.tid.tolist())}),
            "wall_s": round(c.wall_s, 4),
            "sensor_cpu_s": round(c.sensor_cpu_s, 4),
            "exit_code": self.exit_code,
        }


def _sensor(backend: str, target: Target, *, returns: bool, trim_tid: int | None) -> Any:
    if backend == "ebpf":
        from bam.sensors.ebpf import EbpfSyscallSensor

        return EbpfSyscallSensor(target, returns=returns, trim_tid=trim_tid)
    if backend == "tracefs":
        from bam.sensors.tracefs import TracefsSyscallSensor

        return TracefsSyscallSensor(target, trim_tid=trim_tid)
    from bam.sensors.ptrace import StraceSensor

    return StraceSensor(target)


def record_command(
    argv: Sequence[str],
    *,
    backend: str = "auto",
    returns: bool = False,
    stdout: int | None = None,
    stderr: int | None = None,
) -> Recorded:
    """Start ``argv`` under the sensor and record it until it exits (its children too)."""
    choice = choose(backend)
    if choice.backend == "strace":
        from bam.sensors.ptrace import StraceSensor

        cap, code = StraceSensor().run(argv, stdout=stdout)
        return Recorded(cap, choice, code, list(argv), " ".join(argv))
    cmd = GatedCommand(argv, stdout=stdout, stderr=stderr)
    sensor = _sensor(choice.backend, cmd.target(), returns=returns, trim_tid=cmd.pid)
    try:
        sensor.start()
    except BaseException:
        cmd.kill()
        raise
    try:
        cmd.release()
        with _interrupt_to_command(cmd.pid):
            while cmd.poll() is None:
                sensor.poll()
                time.sleep(0.005)
    finally:
        if cmd.poll() is None:
            cmd.kill()
        cap = sensor.close()
    return Recorded(cap, choice, cmd.returncode, list(argv), " ".join(argv))


def record_target(
    target: Target,
    *,
    backend: str = "auto",
    duration: float | None = None,
    returns: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Recorded:
    """Record running processes / a cgroup for ``duration`` s, until the workload is gone,
    until ``stop()`` is true, or until Ctrl-C — whichever comes first."""
    choice = choose(backend)
    sensor = _sensor(choice.backend, target, returns=returns, trim_tid=None)
    sensor.start()
    deadline = None if duration is None else time.monotonic() + duration
    last_check = 0.0
    try:
        while True:
            sensor.poll()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if stop is not None and stop():
                break
            if now - last_check > 0.25:
                last_check = now
                if not target.alive():
                    break
            time.sleep(0.005)
    except KeyboardInterrupt:
        pass
    finally:
        cap = sensor.close()
    return Recorded(cap, choice, None, None, target.label)


@contextlib.contextmanager
def _interrupt_to_command(pid: int) -> Any:
    """While recording a command, Ctrl-C goes to the command; the recording ends with it."""

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            import os

            os.kill(pid, signum)

    try:
        old = signal.signal(signal.SIGINT, forward)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


__all__ = ["Recorded", "SensorError", "record_command", "record_target"]
