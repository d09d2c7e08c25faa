"""Resource and memory samples of a real process tree against independent measurements.

A child allocates N MiB, writes N MiB to disk (fsync), sends N MiB over loopback TCP (and N MiB
over a unix socketpair) and maps an executable page; the sampler must see each within 5% (the
page only has to appear). Loopback traffic of a process outside the workload, running at the
same time, must not be counted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from bam.sensors.resources import ResourceSampler
from bam.sensors.workload import Target
from sensors_support import bam_programs, require_ebpf

MIB = 1 << 20
N = 96

CHILD = r"""
import mmap, os, socket, sys
n = int(sys.argv[1]); path = sys.argv[2]
sys.stdin.readline()                                   # wait for the first sample
buf = bytearray(n << 20)
for i in range(0, len(buf), 4096): buf[i] = 1          # touch every page
with open(path, "wb") as f:
    for _ in range(n): f.write(b"x" * (1 << 20))
    f.flush(); os.fsync(f.fileno())
a, b = socket.socketpair()
sent = 0
data = b"y" * 65536
while sent < (n << 20):
    sent += a.send(data)
    b.recv(1 << 20)
lsn = socket.socket(); lsn.bind(("127.0.0.1", 0)); lsn.listen()
c = socket.create_connection(lsn.getsockname()); d, _ = lsn.accept()
sent = got = 0
while sent < (n << 20):
    sent += c.send(data)
    while got < sent:
        got += len(d.recv(1 << 20))
c.close(); d.close(); lsn.close()
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
print(srv.getsockname()[1], flush=True)
print("done", flush=True)
sys.stdin.readline()
"""


def test_resources_within_five_percent(tmp_path: Path) -> None:
    require_ebpf()  # the network byte counts need it
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", CHILD, str(N), str(tmp_path / "out.bin")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        with ResourceSampler(Target.from_pids([proc.pid])) as sampler:
            before = sampler.sample()
            outsider = threading.Thread(target=_loopback_traffic, args=(32 * MIB,))
            outsider.start()  # this process is not part of the workload
            proc.stdin.write("go\n")
            proc.stdin.flush()
            port = int(proc.stdout.readline())
            assert proc.stdout.readline().strip() == "done"
            outsider.join()
            after = sampler.sample()
            unsupported = dict(sampler.unsupported)
    finally:
        proc.kill()
        proc.wait()
    want = N * MIB
    rss = after.rss_bytes - before.rss_bytes
    assert abs(rss - want) <= 0.05 * want, rss
    assert after.pss_bytes - before.pss_bytes >= 0.95 * want
    written = after.write_bytes - before.write_bytes
    assert abs(written - want) <= 0.05 * want, written
    # wchar counts bytes handed to write(2) (file I/O; send(2) on sockets is not counted)
    assert abs((after.wchar - before.wchar) - want) <= 0.05 * want
    # network bytes per process tree (eBPF at the socket layer): loopback TCP and unix
    assert not unsupported.get("net_bytes"), unsupported
    for field in ("net_tx_bytes", "net_rx_bytes", "unix_tx_bytes", "unix_rx_bytes"):
        got = getattr(after, field) - getattr(before, field)
        assert abs(got - want) <= 0.05 * want, (field, got)
    # perf's software page-fault counter against the kernel's own per-process count
    pf = after.perf["page_faults"] - before.perf["page_faults"]
    proc_faults = (after.minor_faults + after.major_faults) - (
        before.minor_faults + before.major_faults
    )
    assert pf >= want // 4096 * 0.95
    assert abs(pf - proc_faults) <= 0.05 * proc_faults
    # the new executable page
    anon_x = [m for m in after.new_exec_mappings if m["anonymous"] and m["size"] == 4096]
    assert anon_x, after.new_exec_mappings
    assert anon_x[0]["wx"]
    # hardware counters: reported, not fatal, where the host has none
    if "instructions" not in after.perf:
        assert "unsupported" in unsupported["instructions"]
    assert after.listening_ports == [port]
    assert after.cpu_s > before.cpu_s
    assert after.processes == 1
    assert after.threads >= 1
    assert after.fds >= 3
    assert bam_programs() == []


def _loopback_traffic(n: int) -> None:
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen()
    with socket.create_connection(lsn.getsockname()) as c, lsn.accept()[0] as d:
        data, sent = b"o" * 65536, 0
        while sent < n:
            sent += c.send(data)
            d.recv(1 << 20)
    lsn.close()


def test_tree_and_new_processes() -> None:
    proc = subprocess.Popen(["sh", "-c", "read x; sleep 5 & sleep 5 & wait"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        with ResourceSampler(Target.from_pids([proc.pid]), perf=False) as sampler:
            sampler.sample()
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            for _ in range(100):
                s = sampler.sample()
                if len(s.new_processes) >= 2:
                    break
                time.sleep(0.02)
            assert len(s.new_processes) >= 2
            assert s.processes >= 3
    finally:
        for child in Target.from_pids([proc.pid]).current_pids() - {proc.pid}:
            os.kill(child, 9)
        proc.kill()
        proc.wait()


NET_CHILD = r"""
import socket, sys
n = int(sys.argv[1]); sys.stdin.readline()
lsn = socket.socket(); lsn.bind(("127.0.0.1", 0)); lsn.listen()
c = socket.create_connection(lsn.getsockname()); d, _ = lsn.accept()
data, sent, got = b"z" * 65536, 0, 0
while sent < n:
    sent += c.send(data[: n - sent])
    while got < sent:
        got += len(d.recv(1 << 20))
print(got, flush=True)
"""


def test_net_bytes_of_a_cgroup_v2() -> None:
    """The same counter on a cgroup v2 target (filtered by cgroup id in the kernel)."""
    from bam.sensors.netbytes import NetCounter
    from bam.sensors.workload import cgroup_mounts

    require_ebpf()
    v2, _ = cgroup_mounts()
    if v2 is None:
        pytest.skip("no cgroup v2 mount")
    cg = v2 / f"bam-test-net-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    n = 8 * MIB
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", NET_CHILD, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        (cg / "cgroup.procs").write_text(str(proc.pid))
        with NetCounter(Target.from_cgroup(cg)) as nc:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            _loopback_traffic(4 * MIB)  # outside the cgroup: not counted
            assert int(proc.stdout.readline()) == n
            nb = nc.read()
        assert nb.tx("inet") == n, nb
        assert nb.rx("inet") == n, nb
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.02)
    assert bam_programs() == []
