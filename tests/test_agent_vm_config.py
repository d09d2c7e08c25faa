"""A QEMU VM as an agent target (``qmp = ...``): configuration is checked, errors are clear.

Fast: no QEMU is started (the live path is tests/test_demo_vm.py).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from bam.agent.config import TargetSpec, load_settings
from bam.agent.monitor import TargetMonitor
from bam.errors import BamError


def test_vm_target_from_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'server_url = "http://127.0.0.1:1"\n'
        "[[targets]]\n"
        'name = "web-vm"\n'
        'qmp = "/run/bam/vm/web/qmp.sock"\n'
        'vm_trace = "/run/bam/vm/web/trace.bin"\n'
        "profile_s = 30\n"
        "vm_resource_hz = 2\n"
    )
    s = load_settings(cfg, data_dir=tmp_path / "agent")
    (t,) = s.targets
    assert t.qmp == Path("/run/bam/vm/web/qmp.sock")
    assert t.vm_trace == Path("/run/bam/vm/web/trace.bin")
    assert t.kind == "vm"
    assert t.vm_resource_hz == 2
    assert TargetSpec(name="p", pid=1).kind == "process"


def test_vm_target_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one of command, pid, cgroup, qmp"):
        TargetSpec(name="x", qmp=Path("/tmp/q.sock"), pid=1)
    with pytest.raises(ValidationError, match=r"vm_trace .* give qmp"):
        TargetSpec(name="x", pid=1, vm_trace=Path("/tmp/trace.bin"))
    regular = tmp_path / "not-a-socket"
    regular.write_text("")
    with pytest.raises(ValidationError, match="is not a socket"):
        TargetSpec(name="x", qmp=regular)
    with pytest.raises(ValidationError, match="is a directory"):
        TargetSpec(name="x", qmp=tmp_path / "q.sock", vm_trace=tmp_path)
    with pytest.raises(ValidationError, match="vm_resource_hz"):
        TargetSpec(name="x", qmp=tmp_path / "q.sock", vm_resource_hz=0)
    with pytest.raises(ValidationError, match="qmp"):
        TargetSpec.model_validate({"name": "x", "qmp": 5})


def test_vm_target_start_errors_name_the_problem(tmp_path: Path) -> None:
    """A VM that is not there, or whose guest stream cannot be found, fails clearly at start."""
    missing = TargetMonitor(TargetSpec(name="gone", qmp=tmp_path / "qmp.sock"), tmp_path)
    with pytest.raises(BamError, match=r"QMP socket .*qmp.sock does not exist"):
        missing.start()
    missing.close()

    sock_path = tmp_path / "run" / "qmp.sock"
    sock_path.parent.mkdir()
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(sock_path))
    try:
        bare = TargetMonitor(TargetSpec(name="bare", qmp=sock_path), tmp_path)
        with pytest.raises(BamError, match=r"no vm.json beside .* give vm_trace"):
            bare.start()
        bare.close()
        no_trace = TargetMonitor(
            TargetSpec(name="bare", qmp=sock_path, vm_trace=tmp_path / "nope.bin"), tmp_path
        )
        with pytest.raises(BamError, match=r"guest syscall stream .*nope.bin does not exist"):
            no_trace.start()
        no_trace.close()
    finally:
        srv.close()
