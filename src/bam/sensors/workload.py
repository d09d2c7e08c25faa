"""What to watch: a process tree, a cgroup (v2 or v1), or a command BAM starts itself.

Sensors filter *in the kernel* where they can, so the target is resolved to what the kernel
understands: a set of thread-group ids (followed across fork by the sensor) or a cgroup v2 id
and depth. This host has hybrid cgroups (v2 without controllers at ``/sys/fs/cgroup/unified``,
v1 hierarchies with memory/pids/blkio), so both are handled: a v2 cgroup is filtered by id,
which also catches processes moved in later; a v1 cgroup becomes its current processes plus
their descendants (a process moved into a v1 cgroup later is not seen — said in the docs).

A command is started *gated*: the child blocks on a pipe before ``exec`` until the sensor is
attached, so the capture begins with the command's own ``execve`` exactly as ``strace CMD``'s
does, and nothing it does is missed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

from bam.sensors.errors import SensorError, TargetGoneError

TargetKind = Literal["all", "pids", "cgroup"]


@cache
def cgroup_mounts() -> tuple[Path | None, tuple[tuple[str, Path], ...]]:
    """(cgroup v2 mount point or None, ((v1 controllers, mount point), ...)) from mountinfo."""
    v2: Path | None = None
    v1: list[tuple[str, Path]] = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None, ()
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 3:
            continue
        mnt = Path(parts[4].replace("\\040", " "))
        if rparts[0] == "cgroup2" and v2 is None:
            v2 = mnt
        elif rparts[0] == "cgroup":
            opts = [o for o in rparts[2].split(",") if o not in ("rw", "ro", "relatime")]
            v1.append((",".join(opts), mnt))
    return v2, tuple(v1)


def process_exists(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] != "Z"


def start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of ``pid``: with the pid, identifies a process
    across pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def _parents() -> dict[int, int]:
    out: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        out[int(d)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    return out


def descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` and every live process below them (one scan of ``/proc``)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = [r for r in roots if r in parents]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        todo.extend(children.get(p, ()))
    return out


@dataclass(frozen=True)
class Target:
    """A resolved workload: ``pids`` roots (plus descendants), a cgroup, or everything."""

    kind: TargetKind
    pids: tuple[int, ...] = ()
    cgroup: Path | None = None
    cgroup_v2: bool = False
    label: str = ""
    start_times: tuple[int | None, ...] = field(default=(), compare=False)

    @classmethod
    def from_pids(cls, pids: Sequence[int], label: str = "") -> Target:
        for p in pids:
            if not process_exists(p):
                raise TargetGoneError(f"process {p} does not exist (or has already exited)")
        return cls(
            "pids",
            pids=tuple(pids),
            label=label or f"pid {','.join(map(str, pids))}",
            start_times=tuple(start_time(p) for p in pids),
        )

    @classmethod
    def from_cgroup(cls, spec: str | Path) -> Target:
        """A cgroup by absolute path, or by a path relative to the v2 or a v1 mount."""
        v2, v1 = cgroup_mounts()
        p = Path(spec)
        tries = [p] if p.is_absolute() else []
        if not p.is_absolute():
            if v2 is not None:
                tries.append(v2 / p)
            tries += [m / p for _, m in v1]
            tries.append(Path("/sys/fs/cgroup") / p)
        for c in tries:
            if (c / "cgroup.procs").is_file():
                is_v2 = v2 is not None and c.resolve().is_relative_to(v2)
                return cls("cgroup", cgroup=c.resolve(), cgroup_v2=is_v2, label=f"cgroup {c}")
        raise TargetGoneError(
            f"cgroup {spec!s} not found (looked in: {', '.join(str(t) for t in tries[:4])})"
        )

    @classmethod
    def everything(cls) -> Target:
        return cls("all", label="all processes")

    def cgroup_pids(self) -> list[int]:
        """Processes now in the cgroup (and, for v1, what the sensor will follow)."""
        if self.cgroup is None:
            return []
        try:
            text = (self.cgroup / "cgroup.procs").read_text()
        except OSError as e:
            raise TargetGoneError(f"cannot read {self.cgroup}/cgroup.procs: {e.strerror}") from None
        return [int(x) for x in text.split()]

    def cgroup_id_level(self) -> tuple[int, int]:
        """(id, depth) of a v2 cgroup, as ``bpf_get_current_ancestor_cgroup_id`` sees it."""
        v2, _ = cgroup_mounts()
        if self.cgroup is None or not self.cgroup_v2 or v2 is None:
            raise SensorError(f"{self.label} is not a cgroup v2 group")
        rel = self.cgroup.relative_to(v2.resolve())
        return os.stat(self.cgroup).st_ino, len(rel.parts)

    def current_pids(self) -> set[int]:
        """Every process of the workload now (pid roots + descendants, or cgroup members)."""
        if self.kind == "pids":
            return descendants(self.pids)
        if self.kind == "cgroup":
            return descendants(self.cgroup_pids())
        return set()

    def alive(self) -> bool:
        """Whether anything of the workload is still running (pid reuse aware)."""
        if self.kind == "pids":
            for p, st in zip(self.pids, self.start_times or (None,) * len(self.pids), strict=False):
                if process_exists(p) and (st is None or start_time(p) == st):
                    return True
            return False
        if self.kind == "cgroup":
            return bool(self.cgroup_pids()) if self.cgroup and self.cgroup.exists() else False
        return True


class GatedCommand:
    """A child process forked but held before ``exec`` until :meth:`release`.

    The sensor adds the child's pid to its in-kernel filter, attaches, then releases it: the
    first event of the command is its ``execve``. (``subprocess.Popen`` cannot do this: it
    waits for the exec to happen before returning.)
    """

    def __init__(
        self, argv: Sequence[str], *, stdout: int | None = None, stderr: int | None = None
    ) -> None:
        if not argv:
            raise SensorError("no command given")
        exe = shutil.which(argv[0])
        if exe is None:
            raise SensorError(f"command not found (or not executable): {argv[0]}")
        self.argv = list(argv)
        devnull = os.open(os.devnull, os.O_RDWR)
        # subprocess.DEVNULL (-3) is accepted for convenience
        stdout = devnull if stdout == subprocess.DEVNULL else stdout
        stderr = devnull if stderr == subprocess.DEVNULL else stderr
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: wait for the gate, then exec; never returns
            try:
                os.close(w)
                if os.read(r, 1) != b"g":
                    os._exit(126)  # the sensor gave up (or died): do not run unwatched
                os.close(r)
                if stdout is not None:
                    os.dup2(stdout, 1)
                if stderr is not None:
                    os.dup2(stderr, 2)
                os.execv(exe, self.argv)  # noqa: S606  (the user's own command)
            finally:
                os._exit(127)
        os.close(r)
        os.close(devnull)
        self._w: int | None = w
        self.pid = pid
        self.returncode: int | None = None
        self.cpu_s: float | None = None
        """User + system CPU of the command and the children it waited for (once it ended)."""

    def target(self) -> Target:
        return Target("pids", pids=(self.pid,), label=" ".join(self.argv), start_times=(None,))

    def release(self) -> None:
        """Let the command run (exec)."""
        if self._w is not None:
            try:
                os.write(self._w, b"g")
            finally:
                os.close(self._w)
                self._w = None

    def poll(self) -> int | None:
        """Exit status if the command has ended (negative: killed by that signal)."""
        if self.returncode is None:
            pid, status, ru = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                self._reaped(status, ru)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status, ru = os.wait4(self.pid, 0)
            return self._reaped(status, ru)
        return self.returncode

    def _reaped(self, status: int, ru: resource.struct_rusage) -> int:
        code = os.waitstatus_to_exitcode(status)
        self.returncode = code
        self.cpu_s = ru.ru_utime + ru.ru_stime
        return code

    def wait_fd(self) -> int:
        """A pidfd that becomes readable when the command exits (for ``select``), or -1."""
        try:
            return os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            return -1

    def kill(self) -> None:
        """Stop the command (used when the sensor fails to start)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._w is not None:
            os.close(self._w)
            self._w = None
        self.wait()
