"""Resource rates of a watched process tree: sampled, learnt, summarised, released."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bam.agent.resources import ProcessResources
from bam.sensors.workload import Target
from sensors_support import bam_programs, require_ebpf

SENDER = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
block = b"x" * 65536
while True:
    t = time.monotonic()
    for _ in range(16):  # 1 MiB every 0.1 s: ~10 MiB/s
        s.sendall(block)
    time.sleep(max(0.0, 0.1 - (time.monotonic() - t)))
"""


def test_process_rates_are_learnt_and_compared(tmp_path: Path) -> None:
    require_ebpf()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def drain() -> None:
        c, _ = srv.accept()
        c.settimeout(0.2)
        while not stop.is_set():
            try:
                if not c.recv(1 << 20):
                    break
            except TimeoutError:
                continue
        c.close()

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    proc = subprocess.Popen([sys.executable, "-c", SENDER, str(srv.getsockname()[1])])
    res = ProcessResources(Target.from_pids([proc.pid]), hz=10.0)
    try:
        res.learning = True
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            res.maybe_sample()
            time.sleep(0.02)
        profile = res.learn()
        assert 4 * 2**20 < profile["net_tx_bps"] < 40 * 2**20, profile
        assert profile["rss_mb"] > 1
        res.save(tmp_path / "p.json")
        other = ProcessResources.__new__(ProcessResources)
        other.METRICS, other.profile = res.METRICS, {}
        assert ProcessResources.load(other, tmp_path / "p.json")
        assert other.profile == profile
        res.summary()  # drop what was sampled while learning
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            res.maybe_sample()
            time.sleep(0.02)
        scores, top = res.summary()
        assert scores["proc_samples"] >= 5
        assert 0.3 < scores["proc_net_tx_bps_vs_profile"] < 3.0, scores
        assert {"proc_cpu", "proc_rss_mb", "proc_disk_bps", "proc_fds"} <= set(scores)
        assert all(t.startswith("proc: ") for t in top)
    finally:
        res.close()
        proc.kill()
        proc.wait()
        stop.set()
        t.join(2)
        srv.close()
    assert bam_programs() == []
