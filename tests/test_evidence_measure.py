"""Measurements of files, processes (exe + mapped libraries), VMs, BAM itself and models."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bam.evidence import MeasurementError, Target
from bam.evidence.measure import (
    MeasurementCache,
    collect_measurements,
    measure_bam,
    measure_file,
    measure_model,
    measure_process,
    measure_vm,
)


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_file(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(os.urandom(3 << 20))
    m = measure_file(f, "disk")
    assert m.sha256 == _sha(f)
    assert m.size == 3 << 20
    assert m.role == "disk"


def test_cache_sees_in_place_rewrites(tmp_path: Path) -> None:
    f = tmp_path / "kernel"
    f.write_bytes(b"A" * 4096)
    cache = MeasurementCache()
    first = measure_file(f, cache=cache).sha256
    st = f.stat()
    time.sleep(0.01)
    f.write_bytes(b"B" * 4096)  # same size;
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored, ctime is not
    assert measure_file(f, cache=cache).sha256 == _sha(f) != first


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(MeasurementError) as e:
        measure_file(tmp_path / "nope")
    assert "nope" in str(e.value)
    with pytest.raises(MeasurementError):
        measure_file(tmp_path)


def test_own_process_exe_and_libraries() -> None:
    m = measure_process(os.getpid())
    exe = m.files[0]
    assert exe.role == "exe"
    assert exe.path == os.path.realpath(sys.executable)
    assert exe.sha256 == _sha(sys.executable)
    libs = {Path(f.path).name: f for f in m.files if f.role == "lib"}
    libc = next(f for name, f in libs.items() if name.startswith("libc.so"))
    assert libc.sha256 == _sha(libc.path)
    assert len({(f.path, f.sha256) for f in m.files}) == len(m.files)


def test_process_running_a_deleted_binary(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    copy = tmp_path / "payload"
    shutil.copy(sleep, copy)
    digest = _sha(copy)
    proc = subprocess.Popen([str(copy), "30"])
    try:
        time.sleep(0.1)
        copy.unlink()  # what malware does after starting
        m = measure_process(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    exe = m.files[0]
    assert exe.deleted
    assert exe.path == str(copy)
    assert exe.sha256 == digest  # hashed through /proc/PID/exe: the inode that runs


def test_process_that_does_not_exist() -> None:
    with pytest.raises(MeasurementError) as e:
        measure_process(2**22 + 7)
    assert e.value.reason == "measure_failed"


def test_vm_files(tmp_path: Path) -> None:
    paths = {}
    for name in ("disk0.qcow2", "disk1.raw", "vmlinuz", "initrd.img", "OVMF.fd"):
        paths[name] = tmp_path / name
        paths[name].write_bytes(name.encode() * 100)
    files = measure_vm(
        disks=[paths["disk0.qcow2"], paths["disk1.raw"]],
        kernel=paths["vmlinuz"],
        initrd=paths["initrd.img"],
        firmware=[paths["OVMF.fd"]],
    )
    assert [f.role for f in files] == ["disk", "disk", "kernel", "initrd", "firmware"]
    assert all(f.sha256 == _sha(f.path) for f in files)


def test_bam_measures_its_own_code() -> None:
    a = measure_bam()
    b = measure_bam(cache=None)
    assert a == b
    assert a.code_files >= 10
    assert a.python.sha256 == _sha(sys.executable)


def test_model_files_and_collection(tmp_path: Path) -> None:
    meta = tmp_path / "baseline.json"
    arrays = tmp_path / "baseline.npz"
    meta.write_text("{}")
    arrays.write_bytes(b"\x93NUMPY")
    model = measure_model("sha256:" + "f" * 64, [meta, arrays], role="baseline")
    assert [f.sha256 for f in model.files] == [_sha(meta), _sha(arrays)]
    proc = measure_process(os.getpid())
    m = collect_measurements(
        Target(kind="process", name=proc.name, pid=proc.pid), process=proc, models=[model]
    )
    assert m.models[0].model_id.startswith("sha256:")
    assert m.files == proc.files
    assert m.bam.code_sha256 == measure_bam().code_sha256
