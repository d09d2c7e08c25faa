"""cgroup v2 control of a workload: adopt a process tree, freeze/thaw, kill, remove.

Freezing through ``cgroup.freeze`` is atomic for the whole group (every task, including ones
forked while the freeze happens) and reversible, where SIGSTOP to a list of pids races with
fork and can be undone by the workload's own SIGCONT. The state is *read back* from
``cgroup.events`` (``frozen 1``), never assumed. On this host cgroups are hybrid: the v2
hierarchy (``/sys/fs/cgroup/unified``) has no controllers but still offers freeze and kill,
and a process can be in a v2 group whatever its v1 groups are.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from bam.errors import BamError
from bam.sensors.workload import cgroup_mounts, descendants

log = logging.getLogger("bam.actions")

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class ActionError(BamError):
    """An action could not be applied (or verified); the message says which and why."""


def v2_root() -> Path | None:
    """Mount point of the cgroup v2 hierarchy (``None``: no v2 here)."""
    v2, _ = cgroup_mounts()
    return v2


def safe_name(name: str) -> str:
    """A cgroup / nft-table friendly form of a workload name (letters, digits, ``_.-``)."""
    out = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:48] or "workload"
    return out


class Cgroup:
    """One cgroup v2 directory: ``path`` absolute, ``rel`` relative to ``/sys/fs/cgroup``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(cls, name: str) -> Cgroup:
        """``<v2 root>/bam-<name>`` (created if missing; reused if it already exists)."""
        root = v2_root()
        if root is None:
            raise ActionError("no cgroup v2 hierarchy is mounted: cannot freeze by cgroup")
        nm = safe_name(name)
        if not _NAME.fullmatch(nm):
            raise ActionError(f"invalid cgroup name {name!r}")
        path = root / f"bam-{nm}"
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise ActionError(f"cannot create cgroup {path}: {e.strerror}") from None
        log.info("cgroup %s ready", path)
        return cls(path)

    @classmethod
    def of_pid(cls, pid: int) -> Cgroup | None:
        """The v2 cgroup ``pid`` is in (``None`` if no v2 hierarchy or the process is gone)."""
        root = v2_root()
        if root is None:
            return None
        try:
            for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
                hid, _, rest = line.partition(":")
                ctrl, _, rel = rest.partition(":")
                if hid == "0" and ctrl == "":
                    return cls(root / rel.lstrip("/"))
        except OSError:
            return None
        return None

    # ---------------------------------------------------------------- identity
    @property
    def rel(self) -> str:
        """Path relative to ``/sys/fs/cgroup`` — what nftables' ``socket cgroupv2`` wants."""
        return str(self.path.relative_to(CGROUP_ROOT))

    @property
    def level(self) -> int:
        """Depth in the v2 hierarchy (``socket cgroupv2 level N``)."""
        root = v2_root()
        assert root is not None
        return len(self.path.relative_to(root).parts)

    def exists(self) -> bool:
        return (self.path / "cgroup.procs").is_file()

    # ---------------------------------------------------------------- membership
    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def adopt(self, roots: Iterable[int], rounds: int = 5) -> list[int]:
        """Move ``roots`` and all their descendants in; repeated until no new child appears
        (a process forking while we move it would otherwise leave a child outside)."""
        moved: set[int] = set()
        roots = list(roots)
        for _ in range(rounds):
            todo = descendants(roots) - moved
            if not todo:
                break
            for pid in sorted(todo):
                try:
                    (self.path / "cgroup.procs").write_text(str(pid))
                    moved.add(pid)
                except OSError as e:
                    if e.errno in (errno.ESRCH, errno.ENOENT):
                        continue
                    raise ActionError(f"cannot move pid {pid} into {self.path}: {e}") from None
        return sorted(moved)

    def enter(self) -> None:
        """Move the *calling* process in (use as ``preexec_fn`` / in a forked child before
        exec). Start a workload inside its group: sockets belong to the cgroup they were
        created in, so only sockets made after the move are matched by the network cut."""
        (self.path / "cgroup.procs").write_text("0")

    # ---------------------------------------------------------------- freeze
    def frozen(self) -> bool:
        """Read back from ``cgroup.events``: true only once every task is frozen."""
        try:
            for line in (self.path / "cgroup.events").read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "frozen":
                    return v.strip() == "1"
        except OSError:
            return False
        return False

    def _write(self, name: str, value: str) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError as e:
            raise ActionError(f"cannot write {value!r} to {self.path / name}: {e}") from None

    def freeze(self, timeout_s: float = 2.0) -> bool:
        """Freeze and wait until the kernel says frozen; returns the state read back."""
        self._write("cgroup.freeze", "1")
        return self._wait(True, timeout_s)

    def thaw(self, timeout_s: float = 2.0) -> bool:
        """Unfreeze; returns True once the kernel reports the group thawed."""
        self._write("cgroup.freeze", "0")
        return self._wait(False, timeout_s)

    def _wait(self, want: bool, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.frozen() == want:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)

    # ---------------------------------------------------------------- kill / remove
    def kill(self, timeout_s: float = 3.0) -> bool:
        """SIGKILL every task at once (``cgroup.kill``; frozen tasks die too)."""
        if (self.path / "cgroup.kill").exists():
            self._write("cgroup.kill", "1")
        else:  # kernels before 5.14
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        deadline = time.monotonic() + timeout_s
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self.pids()

    def remove(self, timeout_s: float = 3.0) -> None:
        """Remove the (empty) group; tasks still inside are moved back to the root first."""
        root = v2_root()
        if not self.exists():
            return
        if self.frozen():
            with contextlib.suppress(ActionError):
                self.thaw()
        if root is not None:
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(str(pid))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                log.info("cgroup %s removed", self.path)
                return
            except FileNotFoundError:
                return
            except OSError as e:  # EBUSY while zombies are being reaped
                if time.monotonic() > deadline:
                    raise ActionError(f"cannot remove {self.path}: {e.strerror}") from None
                time.sleep(0.01)

    def __repr__(self) -> str:
        return f"Cgroup({str(self.path)!r})"
