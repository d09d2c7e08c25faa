"""Resource rates of a watched process tree: sampled, learnt, summarised, released."""

from __future__ import annotations

import signal
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


def _sink() -> tuple[socket.socket, threading.Event, threading.Thread]:
    """A loopback listener that accepts one connection and reads it until ``stop`` is set."""
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
    return srv, stop, t


def test_process_rates_are_learnt_and_compared(tmp_path: Path) -> None:
    require_ebpf()
    srv, stop, t = _sink()
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


WORKER = """
import signal, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
block = b"x" * 65536
sending = True

def quiet(*_):
    global sending
    sending = False

signal.signal(signal.SIGUSR1, quiet)
print("ready", flush=True)
while True:  # every 10 ms: 64 KiB out (~6 MiB/s) and ~5 ms of CPU
    t = time.monotonic()
    if sending:
        s.sendall(block)
    while time.monotonic() - t < 0.005:
        pass
    time.sleep(max(0.0, 0.01 - (time.monotonic() - t)))
"""


def _sample_for(res: ProcessResources, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        res.maybe_sample()
        time.sleep(0.02)


def test_process_mix_change_is_flagged_though_every_rate_is_within_profile() -> None:
    """A real process profiled while it computes *and* sends; then it stops sending but keeps
    computing. No rate exceeds its maximum; the mixture score rises past 1.0 and names the
    network, while the steady phase stays under it."""
    require_ebpf()
    srv, stop, t = _sink()
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(srv.getsockname()[1])], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    res = ProcessResources(Target.from_pids([proc.pid]), hz=10.0)
    try:
        res.learning = True
        _sample_for(res, 4.0)
        profile = res.learn()
        assert res.mixture is None  # fitted in a child process meanwhile
        assert res.wait_mixture() is not None
        assert res.mixture is not None
        assert res.mixture.samples >= 25
        assert profile["net_tx_bps"] > 2 * 2**20, profile
        assert profile["cpu"] > 0.2, profile
        res.summary()
        _sample_for(res, 2.0)
        steady, steady_top = res.summary()
        assert steady["proc_samples"] >= 10
        assert steady["proc_mix"] < 1.0, steady
        assert not any("resource_mix_unusual" in f for f in steady_top), steady_top

        proc.send_signal(signal.SIGUSR1)  # stop sending; keep computing
        _sample_for(res, 0.5)  # the first sample after the signal still spans some sending
        res.summary()
        _sample_for(res, 2.0)
        quiet, top = res.summary()
        assert quiet["proc_net_tx_bps"] < 2**16, quiet
        assert quiet["proc_cpu_vs_profile"] <= 1.5, quiet  # CPU as busy as it was
        assert quiet["proc_mix"] > 1.0, (steady, quiet)
        [mix] = [f for f in top if "resource_mix_unusual" in f]
        assert mix.startswith("proc: resource_mix_unusual("), mix
        assert "net_tx_bps↓" in mix, mix
    finally:
        res.close()
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        stop.set()
        t.join(2)
        srv.close()
    assert bam_programs() == []
