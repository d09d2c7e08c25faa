"""Helpers shared by the sensor tests: privileges, a compiled syscall loop, leak checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import require, require_tool


def require_ebpf() -> None:
    """Root, BTF, libbpf and a buildable BPF object (fails under BAM_REQUIRE_ALL=1)."""
    require(os.geteuid() == 0, "root (eBPF sensor)")
    require(Path("/sys/kernel/btf/vmlinux").exists(), "kernel BTF")
    from bam.sensors.errors import SensorUnavailableError
    from bam.sensors.select import choose

    try:
        choose("ebpf")
    except SensorUnavailableError as e:
        require(False, f"eBPF backend: {e}")


def loop_binary(tmp: Path) -> Path:
    """A tiny C program: ``loop N`` makes exactly N getppid calls."""
    cc = require_tool("cc")
    src = tmp / "loop.c"
    src.write_text(
        "#include <stdlib.h>\n#include <unistd.h>\n#include <sys/syscall.h>\n"
        "int main(int c, char **v) { long n = atol(v[1]);"
        " for (long i = 0; i < n; i++) syscall(SYS_getppid); return 0; }\n"
    )
    out = tmp / "loop"
    subprocess.run([cc, "-O2", "-o", str(out), str(src)], check=True)
    return out


def _own_prog_ids() -> set[int]:
    """Ids of the BPF programs this process still holds (through any fd: program, link)."""
    ids: set[int] = set()
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            text = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def bam_programs() -> list[str]:
    """BAM BPF programs this process still holds (waits briefly: the kernel frees programs
    lazily). Only this process's: the machine may run other BAM sensors meanwhile, and a
    program we leaked is necessarily held by one of our fds (nothing is pinned)."""
    bpftool = shutil.which("bpftool")
    if bpftool is None:
        pytest.fail("bpftool missing")
    left: list[str] = []
    for _ in range(40):
        out = subprocess.run([bpftool, "prog", "list"], capture_output=True, text=True).stdout
        own = _own_prog_ids()
        left = [
            ln
            for ln in out.splitlines()
            if " name bam_" in ln
            and ln.split(":", 1)[0].strip().isdigit()
            and int(ln.split(":", 1)[0]) in own
        ]
        if not left:
            return []
        time.sleep(0.05)
    return left
