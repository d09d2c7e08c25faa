"""A real QEMU guest (TCG here, KVM where usable): in-guest syscalls, host view, QMP actions.

One guest image per machine (cached under ~/.cache/bam/vm), one long-running guest for this
module (boot 3-6 s on an idle host) plus one short guest that powers itself off. Every QEMU
started here is ended by the fixtures, and the last test checks none is left.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bam.syscalls import id_of
from conftest import require, require_tool

WORKLOAD = """\
echo "round $BAM_ROUND" > /tmp/round
cat /tmp/round /proc/uptime > /dev/null
ls / > /dev/null
dd if=/dev/zero of=/dev/vda bs=4096 count=8 conv=fsync 2>/dev/null
"""


@pytest.fixture(scope="session")
def guest_image() -> object:
    require_tool("qemu-system-x86_64")
    require_tool("apt-get")
    from bam.sensors.errors import SensorUnavailableError
    from bam.sensors.vm.image import build_image, busybox_path

    try:
        busybox_path()
    except SensorUnavailableError as e:
        require(False, str(e))
    return build_image()


@pytest.fixture(scope="module")
def vm(guest_image: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from bam.sensors.vm.image import GuestImage
    from bam.sensors.vm.launch import VmSpec, launch

    assert isinstance(guest_image, GuestImage)
    run = tmp_path_factory.mktemp("vm")
    machine = launch(
        VmSpec(name="test", workload=WORKLOAD, repeat=0, pause_s=0.2),
        image=guest_image,
        run_dir=run,
        ready_timeout=90,
    )
    with machine:
        yield machine
    assert not machine.alive()


def _names(sids: np.ndarray) -> set[int]:
    return {int(s) for s in np.unique(sids)}


def test_guest_syscall_stream(vm: object) -> None:
    from bam.sensors.vm.launch import Vm
    from bam.sensors.vm.stream import GuestSyscallSensor

    assert isinstance(vm, Vm)
    assert vm.info.boot_s is not None
    print(f"guest trace started {vm.info.boot_s:.1f} s after launch ({vm.info.accel})")
    sensor = GuestSyscallSensor(vm.info, from_start=True)
    sensor.start()
    want = {id_of("execve"), id_of("openat"), id_of("write"), id_of("read")}
    seen: set[int] = set()
    total = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (total < 500 or not want <= seen):
        b = sensor.poll()
        total += len(b)
        seen |= _names(b.sid)
        time.sleep(0.2)
    cap = sensor.close()
    print(f"{len(cap)} guest syscalls, {cap.extra['vm']['pages']} pages, drops {cap.drops}")
    assert len(cap) >= 500
    assert want <= _names(cap.events.sid)
    assert cap.drops == 0
    assert cap.complete
    assert cap.extra["vm"]["bad_pages"] == 0
    # guest times are anchored to this host's clock: recent epoch seconds, in order
    ts = cap.events.ts
    assert abs(ts[-1] - time.time()) < 120
    assert np.all(np.diff(ts) >= 0)
    assert len(np.unique(cap.events.tid)) > 5  # init + many busybox children


def test_host_side_resources(vm: object) -> None:
    from bam.sensors.vm.launch import Vm
    from bam.sensors.vm.qmp import Qmp
    from bam.sensors.vm.resources import VmResourceSampler

    assert isinstance(vm, Vm)
    with Qmp(vm.qmp_path) as q:
        assert q.qemu_pid() == vm.pid
        s = VmResourceSampler(q).sample()
    assert s.status == "running"
    assert s.cpu_s > 0
    assert s.rss_bytes > 32 << 20
    assert s.threads >= 2
    assert len(s.vcpus) == 1
    v = s.vcpus[0]
    assert Path(f"/proc/{vm.pid}/task/{v.thread_id}").is_dir()
    assert 0 < v.cpu_s <= s.cpu_s
    assert "disk0" in s.block
    assert s.block["disk0"]["wr_bytes"] > 0
    assert "nic0" in s.net
    assert "net_bytes" in s.unsupported  # -netdev user: said, not faked


def test_record_vm_cli(vm: object, tmp_path: Path) -> None:
    from bam.cli import app
    from bam.sensors.vm.launch import Vm
    from bam.traces.recording import read_recording

    assert isinstance(vm, Vm)
    out = tmp_path / "guest.bamrec"
    res = CliRunner().invoke(
        app, ["record", "--vm", str(vm.qmp_path), "--duration", "2", "-o", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    tr = read_recording(out)
    assert len(tr.events) > 50
    assert tr.meta["backend"] == "vm-tracefs"
    assert tr.meta["complete"] is True
    r = tr.meta["vm_resources"]
    assert len(r["ts"]) >= 3
    assert r["cpu_s"][-1] > r["cpu_s"][0]
    assert r["vcpu_cpu_s"].shape[1] == 1


def test_qmp_actions(vm: object, tmp_path: Path) -> None:
    from bam.actions import vm as actions
    from bam.sensors.vm.launch import Vm
    from bam.sensors.vm.qmp import Qmp
    from bam.sensors.vm.resources import process_cpu_s

    assert isinstance(vm, Vm)
    with Qmp(vm.qmp_path) as q:
        rec = actions.pause(q)
        assert rec.ok
        assert rec.details["status"] == "paused"
        assert rec.undo == "resume"
        time.sleep(0.3)
        c0, size0 = process_cpu_s(vm.pid), vm.info.trace.stat().st_size
        time.sleep(1.5)
        c1, size1 = process_cpu_s(vm.pid), vm.info.trace.stat().st_size
        assert c1 - c0 <= 0.03, f"QEMU used {c1 - c0:.2f} s CPU while paused"
        assert size1 == size0  # the guest did nothing, so it traced nothing

        dump = actions.dump_memory(q, tmp_path / "mem.elf")
        assert dump.ok, dump.reasons
        assert dump.details["bytes"] >= 256 << 20
        (tmp_path / "mem.elf").unlink()

        rec = actions.resume(q)
        assert rec.ok
        assert rec.details["status"] == "running"
        time.sleep(1.5)
        assert process_cpu_s(vm.pid) > c1
        assert vm.info.trace.stat().st_size > size1

        down = actions.set_link(q, up=False)
        assert down.applied
        # read back from the NIC itself (virtio-net config status; QEMU 7.2's `info network`
        # shows no link state)
        assert down.details["read_back"]["nic0"] is False
        assert down.verified
        up = actions.set_link(q, "nic0", up=True)
        assert up.ok
        assert up.details["read_back"]["nic0"] is True

        bad = actions.set_link(q, "no-such-nic", up=False)
        assert not bad.applied
        assert bad.reasons

        # the agent's executor: isolate = pause + link down, read back through the VM's second
        # monitor while this session holds the first (QEMU serves one client per socket)
        act = actions.VmActuator("test", q, snapshot_dir=tmp_path)
        iso = act.apply("isolate", ["test"])
        assert iso.ok, iso
        assert iso.details["link_read_back"] == {"nic0": False}
        assert vm.info.qmp_ops is not None
        with Qmp(vm.info.qmp_ops) as other:
            assert other.status() == "paused"
            assert actions.link_state(other) == {"nic0": False}
        rel = act.release()
        assert rel.ok, rel
        assert q.status() == "running"
        with pytest.raises(actions.ActionError, match="unknown action"):
            act.apply("reboot")

        rec = actions.terminate(q)
    assert rec.ok
    assert rec.details["exited"]
    vm.wait(10)
    assert not vm.alive()


def test_guest_runs_once_over_serial(guest_image: object, tmp_path: Path) -> None:
    """ttyS1 transport, a finite workload: the trailer arrives and accounts for every event."""
    from bam.sensors.vm.image import GuestImage
    from bam.sensors.vm.launch import VmSpec, launch
    from bam.sensors.vm.stream import GuestSyscallSensor

    assert isinstance(guest_image, GuestImage)
    spec = VmSpec(
        name="once", workload=WORKLOAD, repeat=2, pause_s=0.1, transport="serial", net=False
    )
    with launch(spec, image=guest_image, run_dir=tmp_path, ready_timeout=90) as machine:
        code = machine.wait(90)  # the guest powers itself off
        assert code is not None, "guest did not power off"
        sensor = GuestSyscallSensor(machine.info, from_start=True)
        sensor.start()
        cap = sensor.close()
    st = cap.extra["vm"]["guest_stats"]
    print(f"serial: {len(cap)} events, guest stats {st}")
    assert cap.extra["vm"]["ended"]
    assert st["read events"] == len(cap) > 100
    assert cap.drops == 0
    assert id_of("execve") in _names(cap.events.sid)


def test_no_qemu_left_behind(vm: object) -> None:
    from bam.sensors.vm.launch import Vm

    assert isinstance(vm, Vm)
    vm.cleanup()
    mine = [p for p in os.listdir("/proc") if p.isdigit() and _is_qemu_child(int(p))]
    assert not mine, f"QEMU processes left: {mine}"


def _is_qemu_child(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm = stat[stat.index("(") + 1 : stat.rfind(")")]
    ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
    return comm.startswith("qemu-system") and ppid == os.getpid()
