"""A target refuses to profile while its workload is under an open alert; config is checked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from bam.agent.config import TargetSpec
from bam.agent.monitor import ProfileRefusedError, TargetMonitor
from bam.sensors.workload import Target
from sensors_support import bam_programs, require_ebpf


def test_profiling_is_refused_under_an_open_alert(tmp_path: Path) -> None:
    require_ebpf()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        spec = TargetSpec(name="held", pid=proc.pid, profile_s=1)
        mon = TargetMonitor(spec, tmp_path, open_alert=True)
        with pytest.raises(ProfileRefusedError, match="open alert"):
            mon.start()
        mon.close(stop_command=False)
        assert Target.from_pids([proc.pid]).alive()  # the workload itself is untouched
    finally:
        proc.kill()
        proc.wait()
    assert bam_programs() == []


def test_target_needs_exactly_one_kind() -> None:
    with pytest.raises(ValidationError, match="exactly one of command, pid, cgroup"):
        TargetSpec(name="x", pid=1, command=["true"])
    with pytest.raises(ValidationError, match="exactly one"):
        TargetSpec(name="x")
