"""Resource and memory samples of a real process tree against independent measurements.

A child allocates N MiB, writes N MiB to disk (fsync), sends N bytes over loopback and maps an
executable page; the sampler must see each within 5% (the page only has to appear).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bam.sensors.resources import ResourceSampler
from bam.sensors.workload import Target

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
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
print(srv.getsockname()[1], flush=True)
print("done", flush=True)
sys.stdin.readline()
"""


def test_resources_within_five_percent(tmp_path: Path) -> None:
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
            proc.stdin.write("go\n")
            proc.stdin.flush()
            port = int(proc.stdout.readline())
            assert proc.stdout.readline().strip() == "done"
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
