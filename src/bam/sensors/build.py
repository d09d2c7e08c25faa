"""Build (or find) the compiled BPF object.

``make install`` runs ``python -m bam.sensors.build build/bpf``: bpftool dumps ``vmlinux.h``
from the running kernel's BTF (2.8 MB, so it is generated, never committed), clang compiles
``bpf/*.bpf.c`` for the BPF target and ``llvm-strip -g`` drops DWARF but keeps the BTF that
CO-RE relocation needs. Because CO-RE relocates against the BTF of whatever kernel loads the
object, one build runs on other kernels too; the ``vmlinux.h`` only supplies type layouts.

At run time :func:`bpf_object` looks for the object in ``$BAM_BPF_DIR``, then ``build/bpf`` of
a source checkout, then beside the source in the package; if none is newer than its source
and clang + bpftool are present it builds one into the user cache, so a fresh ``pip install``
works too. Every failure names the missing tool and the package that provides it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import IO, Final

from bam.sensors.errors import SensorUnavailableError

OBJECT: Final = "syscalls.bpf.o"
SOURCE: Final = "syscalls.bpf.c"
_BTF: Final = Path("/sys/kernel/btf/vmlinux")


def source_path() -> Path:
    """The shipped BPF C source."""
    return Path(str(resources.files("bam.sensors").joinpath("bpf", SOURCE)))


def _digest() -> str:
    return hashlib.sha256(source_path().read_bytes()).hexdigest()[:16]


def _tool(*names: str, package: str) -> str:
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    raise SensorUnavailableError(
        f"cannot build the BPF object: {names[0]} not found (apt-get install {package})"
    )


def build(out_dir: Path) -> Path:
    """Compile the BPF object into ``out_dir`` (vmlinux.h dumped beside it); returns its path."""
    if not _BTF.exists():
        raise SensorUnavailableError(
            f"cannot build the BPF object: {_BTF} is missing (kernel built without BTF)"
        )
    bpftool = _tool("bpftool", package="bpftool")
    clang = _tool("clang", "clang-16", "clang-15", "clang-14", package="clang")
    strip = shutil.which("llvm-strip") or shutil.which("llvm-strip-14")
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        raise SensorUnavailableError(
            "cannot build the BPF object: bpf/bpf_helpers.h missing (apt-get install libbpf-dev)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    vmlinux = out_dir / "vmlinux.h"
    with tempfile.NamedTemporaryFile("wb", dir=out_dir, delete=False, suffix=".h") as tmp:
        _run([bpftool, "btf", "dump", "file", str(_BTF), "format", "c"], stdout=tmp)
    os.replace(tmp.name, vmlinux)
    obj = out_dir / OBJECT
    tmp_obj = out_dir / f".{OBJECT}.tmp"
    _run(
        [
            clang,
            "-g",
            "-O2",
            "-target",
            "bpf",
            "-mcpu=v3",
            "-D__TARGET_ARCH_x86",
            "-I",
            str(out_dir),
            "-c",
            str(source_path()),
            "-o",
            str(tmp_obj),
        ]
    )
    if strip:
        _run([strip, "-g", str(tmp_obj)])
    os.replace(tmp_obj, obj)
    (out_dir / f"{OBJECT}.src-sha256").write_text(_digest() + "\n")
    return obj


def _run(cmd: list[str], stdout: IO[bytes] | None = None) -> None:
    try:
        subprocess.run(
            cmd,
            check=True,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except subprocess.CalledProcessError as e:
        msg = (e.stderr or b"").decode("utf-8", "replace").strip()[-1500:]
        raise SensorUnavailableError(f"building the BPF object failed: {cmd[0]}: {msg}") from None


def _fresh(obj: Path) -> bool:
    stamp = obj.parent / f"{OBJECT}.src-sha256"
    try:
        return obj.is_file() and stamp.read_text().strip() == _digest()
    except OSError:
        return False


def candidates() -> list[Path]:
    """Where a built object is looked for, in order."""
    out: list[Path] = []
    env = os.environ.get("BAM_BPF_DIR")
    if env:
        out.append(Path(env) / OBJECT)
    src = source_path()
    # A source checkout (src layout): <repo>/src/bam/sensors/bpf/x.c -> <repo>/build/bpf
    repo = src.parents[4]
    if (repo / "pyproject.toml").is_file():
        out.append(repo / "build" / "bpf" / OBJECT)
    out.append(src.parent / OBJECT)
    out.append(_cache_dir() / OBJECT)
    return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bam" / "bpf"


def bpf_object() -> Path:
    """Path of an up-to-date compiled BPF object, building one into the cache if needed."""
    for c in candidates():
        if _fresh(c):
            return c
    return build(_cache_dir())


def main(argv: list[str] | None = None) -> int:
    """``python -m bam.sensors.build [OUT_DIR]`` (what ``make`` runs)."""
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path("build/bpf")
    try:
        obj = build(out)
    except SensorUnavailableError as e:
        print(f"bam.sensors.build: {e}", file=sys.stderr)
        return 1
    print(obj)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
