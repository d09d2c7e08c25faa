"""Last-resort system-call backend: ``strace -f`` (ptrace), parsed by BAM's strace reader.

It works anywhere strace does (no BPF, no tracefs, not even root for your own processes), and
it loses nothing, because ptrace *stops* the tracee at every call — which is also why it is
slow (measured here: ~480x on tiny syscalls, ~39x on Python file I/O). Use it when nothing
else is available, and for reference recordings.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bam.sensors.capture import Capture
from bam.sensors.errors import SensorError, SensorUnavailableError
from bam.sensors.workload import Target
from bam.syscalls import canonical_names, table
from bam.traces.strace import read_strace


def strace_path() -> str:
    p = shutil.which("strace")
    if p is None:
        raise SensorUnavailableError("strace not found (apt-get install strace)")
    return p


@cache
def _id_to_nr() -> npt.NDArray[np.int32]:
    lut = np.full(1 << 21, -1, dtype=np.int32)
    ids = {n: i for i, n in enumerate(canonical_names())}
    for name, nr in table("x86_64").items():
        lut[ids[name]] = nr
    return lut


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class StraceSensor:
    """``strace -f -ttt`` on a command (:meth:`run`) or on live processes (:meth:`start`)."""

    name = "strace"

    def __init__(self, target: Target | None = None, *, log_dir: Path | None = None) -> None:
        self.target = target
        self._dir = Path(tempfile.mkdtemp(prefix="bam-strace-", dir=log_dir))
        self.log = self._dir / "strace.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._t0 = 0.0
        self._cpu0 = 0.0
        self.result: Capture | None = None

    def _cmd(self) -> list[str]:
        return [strace_path(), "-f", "-ttt", "-qq", "-o", str(self.log)]

    def run(self, argv: Sequence[str], *, stdout: int | None = None) -> tuple[Capture, int]:
        """Run ``argv`` under strace to completion; returns (capture, its exit status)."""
        cpu0, t0 = _children_cpu(), time.monotonic()
        try:
            proc = subprocess.run([*self._cmd(), "--", *argv], stdout=stdout, check=False)
        except OSError as e:
            raise SensorError(f"cannot run strace: {e}") from None
        wall = time.monotonic() - t0
        # strace's own CPU minus what the tracee used is not separable here: report strace's
        # CPU as everything the children used (an upper bound of the sensor's cost).
        return self._finish(wall, _children_cpu() - cpu0), proc.returncode

    def start(self) -> None:
        """Attach to the target's processes (``-p``; new children are followed by ``-f``)."""
        if self.target is None:
            raise SensorError("strace sensor: no target to attach to")
        pids = sorted(self.target.current_pids() or set(self.target.pids))
        if not pids:
            raise SensorError(f"{self.target.label}: no process to attach to")
        args = self._cmd()
        for p in pids:
            args += ["-p", str(p)]
        self._t0, self._cpu0 = time.monotonic(), _children_cpu()
        self._proc = subprocess.Popen(args, stderr=subprocess.PIPE)
        time.sleep(0.2)  # strace attaches asynchronously
        if self._proc.poll() is not None:
            err = (self._proc.stderr.read() if self._proc.stderr else b"").decode(errors="replace")
            raise SensorError(f"strace could not attach: {err.strip()[-300:]}")

    def poll(self) -> int:
        return 0

    def close(self) -> Capture:
        if self.result is not None:
            return self.result
        if self._proc is None:
            raise SensorError("sensor was never started")
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # strace detaches cleanly on SIGINT
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        return self._finish(time.monotonic() - self._t0, _children_cpu() - self._cpu0)

    def _finish(self, wall: float, cpu: float) -> Capture:
        try:
            if not self.log.exists() or self.log.stat().st_size == 0:
                raise SensorError("strace wrote no events (did the command start?)")
            trace = read_strace(self.log)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
        ev = trace.events
        sid = ev.sid
        nr = np.where(
            sid < len(_id_to_nr()), _id_to_nr()[np.minimum(sid, len(_id_to_nr()) - 1)], -1
        )
        self.result = Capture(
            backend=self.name,
            events=ev,
            nr=nr.astype(np.int32),
            args={k: list(v) for k, v in trace.meta.get("args", {}).items()},
            seen=len(ev),
            drops=0,
            sensor_cpu_s=cpu,
            wall_s=wall,
            extra={"strace_unknown_names": trace.meta.get("unknown_names", {})},
        )
        return self.result

    def __del__(self) -> None:
        if self._dir.exists():
            shutil.rmtree(self._dir, ignore_errors=True)
        if os.getpid() and self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
