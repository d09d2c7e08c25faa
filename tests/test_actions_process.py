"""Actions on a real process tree: applied, read back (not assumed), and undone.

The tree is a Python parent that listens on a loopback port and forks two children; every
process bumps a counter file and tries to connect to a listener of the test about every
20 ms, writing what happened. So a freeze is checked by counters that stop (and by
``cgroup.events``), a network cut by connects that fail from inside and by the workload's own
port no longer answering, and every undo by both coming back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bam.actions.cgroup import Cgroup, v2_root
from bam.actions.network import NetworkCut
from bam.actions.process import ProcessActuator, proc_state, tcp_reachable
from bam.sensors.sockets import SocketInfo, workload_sockets
from bam.sensors.workload import descendants
from conftest import require, require_tool

TREE = textwrap.dedent(
    """
    import os, socket, sys, time
    out, port = sys.argv[1], int(sys.argv[2])
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(16)
    open(os.path.join(out, "port"), "w").write(str(srv.getsockname()[1]))
    for _ in range(2):
        if os.fork() == 0:
            break
    me = os.getpid(); n = 0
    while True:
        n += 1
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close(); r = "ok"
        except OSError as e:
            r = "fail"
        with open(os.path.join(out, f"{me}.tmp"), "w") as f:
            f.write(f"{n} {r}")
        os.replace(os.path.join(out, f"{me}.tmp"), os.path.join(out, str(me)))
        time.sleep(0.02)
    """
)


class Tree:
    def __init__(self, tmp: Path, cgroup: Cgroup | None = None) -> None:
        self.out = tmp
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.listener.setblocking(False)
        port = self.listener.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TREE, str(tmp), str(port)],
            start_new_session=True,
            preexec_fn=cgroup.enter if cgroup is not None else None,
        )
        deadline = time.monotonic() + 10
        while len(self.states()) < 3 or not (tmp / "port").exists():
            assert time.monotonic() < deadline, "tree did not start"
            self.drain()
            time.sleep(0.02)
        self.port = int((tmp / "port").read_text())

    def drain(self) -> None:
        while True:
            try:
                c, _ = self.listener.accept()
                c.close()
            except BlockingIOError:
                return

    def states(self) -> dict[int, tuple[int, str]]:
        out: dict[int, tuple[int, str]] = {}
        for f in self.out.iterdir():
            if f.name.isdigit():
                try:
                    n, r = f.read_text().split()
                except (OSError, ValueError):
                    continue
                out[int(f.name)] = (int(n), r)
        return out

    def counts_after(self, seconds: float) -> tuple[dict[int, int], dict[int, int]]:
        a = {p: n for p, (n, _) in self.states().items()}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.drain()
            time.sleep(0.01)
        b = {p: n for p, (n, _) in self.states().items()}
        return a, b

    def results_after(self, seconds: float) -> set[str]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.drain()
            time.sleep(0.01)
        return {r for _, r in self.states().values()}

    def close(self) -> None:
        for p in descendants([self.proc.pid]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        self.proc.wait(5)
        self.listener.close()


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    t = Tree(tmp_path)
    try:
        yield t
    finally:
        t.close()


def _name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout


def test_isolate_freezes_and_cuts_then_release_restores(tmp_path: Path) -> None:
    require(v2_root() is not None, "a cgroup v2 hierarchy")
    require_tool("nft")
    name = _name()
    # started inside its group, as the agent starts workloads: its listener is matched too
    cg = Cgroup.create(name)
    tree = Tree(tmp_path, cg)
    try:
        with ProcessActuator(name, [tree.proc.pid], cgroup=cg, owns_cgroup=True) as act:
            assert act.cgroup is not None
            rec = act.isolate()
            assert rec.applied, rec
            assert rec.verified, rec
            # read back: the kernel says frozen, every process of the tree is inside
            assert act.cgroup.frozen()
            assert set(act.cgroup.pids()) == descendants([tree.proc.pid])
            a, b = tree.counts_after(0.4)
            assert a == b, "frozen processes kept running"
            # the workload's own listener no longer answers (input dropped by the cgroup rule)
            assert not tcp_reachable("127.0.0.1", tree.port, 0.5)
            assert f"bam_iso_{name.replace('-', '_')}" in _nft_tables()
            # undo
            rel = act.release()
            assert rel.verified, rel
            assert not act.cgroup.frozen()
            a, b = tree.counts_after(0.4)
            assert all(b[p] > a[p] for p in a), "processes did not resume"
            assert tcp_reachable("127.0.0.1", tree.port, 1.0)
            assert tree.results_after(0.3) == {"ok"}
    finally:
        tree.close()
    assert not cg.path.exists(), "cgroup left behind"
    assert "bam_iso_" + name.replace("-", "_") not in _nft_tables()


def test_network_cut_blocks_outbound_connects_and_is_undone(tree: Tree) -> None:
    require(v2_root() is not None, "a cgroup v2 hierarchy")
    require_tool("nft")
    cg = Cgroup.create(_name())
    try:
        cg.adopt([tree.proc.pid])
        assert tree.results_after(0.3) == {"ok"}
        cut = NetworkCut(cg)
        cut.apply()
        try:
            assert cut.active()
            # processes keep running (not frozen) but every connect from inside fails
            a, b = tree.counts_after(0.5)
            assert all(b[p] > a[p] for p in a)
            assert tree.results_after(0.3) == {"fail"}
            # traffic of processes outside the cgroup is untouched
            with socket.create_connection(("127.0.0.1", tree.listener.getsockname()[1]), 1):
                pass
        finally:
            cut.remove()
        assert not cut.active()
        assert tree.results_after(0.4) == {"ok"}
    finally:
        cg.kill()
        cg.remove()
    assert not cg.path.exists()


def test_network_cut_by_port_covers_sockets_made_before_adoption(tree: Tree) -> None:
    """The tree's listener exists before the tree joins the group: the cut still closes it,
    by the ports :func:`workload_sockets` finds, and leaves other listeners alone."""
    require(v2_root() is not None, "a cgroup v2 hierarchy")
    require_tool("nft")
    cg = Cgroup.create(_name())
    try:
        cg.adopt(descendants([tree.proc.pid]))
        socks = workload_sockets(cg.pids())
        assert SocketInfo("tcp", tree.port, True) in socks
        assert tcp_reachable("127.0.0.1", tree.port)
        cut = NetworkCut(cg, sockets=socks)
        rules = cut.ruleset()
        assert "tcp dport {" in rules
        assert f" {tree.port}" in rules
        cut.apply()
        try:
            assert not tcp_reachable("127.0.0.1", tree.port, 0.5)
            # the test's own listener (outside the group) still answers
            with socket.create_connection(("127.0.0.1", tree.listener.getsockname()[1]), 1):
                pass
        finally:
            cut.remove()
        assert tcp_reachable("127.0.0.1", tree.port)
    finally:
        cg.kill()
        cg.remove()


def test_sigstop_fallback_without_cgroup(tree: Tree) -> None:
    with ProcessActuator(_name(), [tree.proc.pid], use_cgroup=False) as act:
        assert act.cgroup is None
        rec = act.isolate()
        assert rec.applied
        pids = rec.details["sigstop"]
        assert len(pids) == 3
        assert {proc_state(p) for p in pids} == {"T"}
        assert rec.details["network_cut"] is False  # said, not hidden
        a, b = tree.counts_after(0.3)
        assert a == b
        act.release()
        # SIGCONT is delivered asynchronously: give the scheduler a moment
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(proc_state(p) == "T" for p in pids):
            time.sleep(0.02)
        assert all(proc_state(p) in ("S", "R", "D") for p in pids)
        a, b = tree.counts_after(0.3)
        assert all(b[p] > a[p] for p in a)


def test_terminate_kills_the_whole_tree(tree: Tree) -> None:
    require(v2_root() is not None, "a cgroup v2 hierarchy")
    pids = descendants([tree.proc.pid])
    with ProcessActuator(_name(), [tree.proc.pid]) as act:
        act.isolate()  # frozen tasks must die too
        rec = act.terminate()
        assert rec.verified
        tree.proc.wait(5)
        assert all(proc_state(p) in (None, "Z") for p in pids)


def test_terminate_by_signals_without_cgroup(tree: Tree) -> None:
    pids = descendants([tree.proc.pid])
    with ProcessActuator(_name(), [tree.proc.pid], use_cgroup=False) as act:
        rec = act.terminate()
    tree.proc.wait(5)
    assert all(proc_state(p) in (None, "Z") for p in pids)
    assert rec.applied


def test_investigate_snapshots_and_keeps_running(tree: Tree, tmp_path: Path) -> None:
    with ProcessActuator(_name(), [tree.proc.pid], snapshot_dir=tmp_path / "snap") as act:
        rec = act.investigate()
        assert rec.verified
        snap = Path(rec.details["snapshot"])
        manifest = (snap / "manifest.json").read_bytes()
        assert hashlib.sha256(manifest).hexdigest() == rec.details["manifest_sha256"]
        maps = (snap / str(tree.proc.pid) / "maps").read_bytes()
        assert b"python" in maps
        fds = (snap / str(tree.proc.pid) / "fds").read_text()
        assert "socket:" in fds
        a, b = tree.counts_after(0.3)
        assert all(b[p] > a[p] for p in a)


def test_unknown_action_is_refused(tree: Tree) -> None:
    from bam.actions.cgroup import ActionError

    with (
        ProcessActuator(_name(), [tree.proc.pid], use_cgroup=False) as act,
        pytest.raises(ActionError, match="unknown action"),
    ):
        act.apply("nuke")
