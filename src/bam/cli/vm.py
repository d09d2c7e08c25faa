"""``bam vm``: build and start BAM's demo guest, look at a VM from the host, act on it.

``bam vm build`` fetches Debian's cloud kernel and writes the busybox initramfs (once, cached);
``bam vm start`` boots it under QEMU (KVM where usable, else TCG) with QMP on a unix socket
and its in-guest syscall stream on a file, and prints the socket for ``bam record --vm``;
``bam vm status`` samples the QEMU process, vCPU threads and devices; ``bam vm pause``,
``resume``, ``terminate``, ``link``, ``dump`` are the policy actions of
:mod:`bam.actions.vm`, by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bam.cli import app as root
from bam.cli._common import console, print_json, user_errors

if TYPE_CHECKING:
    from bam.actions.vm import VmActionRecord

app = typer.Typer(help="Build, start, inspect and act on QEMU guests (QMP).", no_args_is_help=True)
root.add_typer(app, name="vm")

QmpArg = Annotated[Path, typer.Argument(help="The VM's QMP socket (RUN_DIR/qmp.sock).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command("build")
def build_cmd(
    kernel: Annotated[
        Path | None, typer.Option("--kernel", help="Use this bzImage instead of Debian's.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build (or show the cached) guest kernel + initramfs."""
    from bam.sensors.vm.image import build_image

    with user_errors():
        img = build_image(kernel=kernel, force=force)
    if as_json:
        print_json(img.manifest())
    else:
        console.print(f"guest image ({img.kernel_package}) in {img.directory}", highlight=False)


@app.command("start")
def start_cmd(
    run_dir: Annotated[
        Path | None, typer.Option("--dir", help="Run directory (default: a new one in /tmp).")
    ] = None,
    name: Annotated[str, typer.Option("--name", help="VM name.")] = "bam-guest",
    workload: Annotated[
        Path | None, typer.Option("--workload", help="Shell script the guest runs.")
    ] = None,
    repeat: Annotated[
        int, typer.Option("--repeat", help="Rounds of the workload; 0 = until stopped.")
    ] = 0,
    pause: Annotated[float, typer.Option("--pause", help="Seconds between rounds.")] = 1.0,
    memory: Annotated[int, typer.Option("--memory", help="Guest RAM in MiB.")] = 256,
    accel: Annotated[str, typer.Option("--accel", help="auto, kvm or tcg.")] = "auto",
    transport: Annotated[
        str, typer.Option("--transport", help="Trace port: virtio or serial (ttyS1).")
    ] = "virtio",
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Wait for the guest; Ctrl-C ends it.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Boot the demo guest; prints its QMP socket (QEMU keeps running unless --foreground)."""
    from bam.sensors.errors import SensorError
    from bam.sensors.vm.launch import VmSpec, launch

    with user_errors():
        if accel not in ("auto", "kvm", "tcg"):
            raise SensorError(f"--accel {accel!r}: choose auto, kvm or tcg")
        if transport not in ("virtio", "serial"):
            raise SensorError(f"--transport {transport!r}: choose virtio or serial")
        script = None
        if workload is not None:
            try:
                script = workload.read_text()
            except OSError as e:
                raise SensorError(f"--workload {workload}: {e.strerror}") from None
        spec = VmSpec(
            name=name,
            memory_mb=memory,
            workload=script,
            repeat=repeat,
            pause_s=pause,
            accel=accel,  # type: ignore[arg-type]
            transport=transport,  # type: ignore[arg-type]
        )
        vm = launch(spec, run_dir=run_dir)
    info = vm.info
    out: dict[str, Any] = {
        "pid": info.pid,
        "qmp": str(info.qmp),
        "run_dir": str(info.run_dir),
        "trace": str(info.trace),
        "console": str(info.console),
        "accel": info.accel,
        "boot_s": round(info.boot_s or 0.0, 2),
    }
    if as_json:
        print_json(out)
    else:
        console.print(
            f"guest running (pid {info.pid}, {info.accel}, trace after {out['boot_s']} s); "
            f"record it with: bam record --vm {info.qmp} -o guest.bamrec",
            highlight=False,
        )
    if foreground:
        try:
            vm.wait()
        except KeyboardInterrupt:
            pass
        finally:
            vm.kill()


@app.command("status")
def status_cmd(qmp: QmpArg, as_json: JsonOpt = False) -> None:
    """Host-side view of a VM: QEMU CPU/RSS/I/O, vCPU threads, block and NIC statistics."""
    from bam.sensors.vm.qmp import Qmp
    from bam.sensors.vm.resources import VmResourceSampler

    with user_errors(), Qmp(qmp) as q:
        s = VmResourceSampler(q).sample()
    if as_json:
        print_json(s.as_dict())
        return
    console.print(
        f"{s.status}: cpu {s.cpu_s:.2f} s, rss {s.rss_bytes >> 20} MiB, {s.threads} threads, "
        f"io r/w {s.read_bytes}/{s.write_bytes} B",
        highlight=False,
    )
    for v in s.vcpus:
        console.print(f"  vcpu{v.index} thread {v.thread_id}: {v.cpu_s:.2f} s", highlight=False)
    for dev, st in s.block.items():
        console.print(
            f"  block {dev}: rd {st['rd_bytes']} B wr {st['wr_bytes']} B", highlight=False
        )
    for nic, st in s.net.items():
        console.print(f"  net {nic}: {st}", highlight=False)
    for k, why in s.unsupported.items():
        console.print(f"  ({k}: {why})", highlight=False)


def _report(res: VmActionRecord, as_json: bool) -> None:
    if as_json:
        print_json(res.as_dict())
    else:
        state = (
            "ok" if res.ok else "applied, not verified" if res.applied else "[bold red]failed[/]"
        )
        why = f" ({'; '.join(res.reasons)})" if res.reasons else ""
        console.print(f"{res.action} {res.target}: {state} {res.details}{why}", highlight=False)
    if not res.applied:
        raise typer.Exit(1)


@app.command("pause")
def pause_cmd(qmp: QmpArg, as_json: JsonOpt = False) -> None:
    """Halt the guest's vCPUs (QMP stop)."""
    from bam.actions.vm import pause

    with user_errors():
        res = pause(qmp)
    _report(res, as_json)


@app.command("resume")
def resume_cmd(qmp: QmpArg, as_json: JsonOpt = False) -> None:
    """Let a paused guest run again (QMP cont)."""
    from bam.actions.vm import resume

    with user_errors():
        res = resume(qmp)
    _report(res, as_json)


@app.command("terminate")
def terminate_cmd(qmp: QmpArg, as_json: JsonOpt = False) -> None:
    """End QEMU now (QMP quit)."""
    from bam.actions.vm import terminate

    with user_errors():
        res = terminate(qmp)
    _report(res, as_json)


@app.command("link")
def link_cmd(
    qmp: QmpArg,
    up: Annotated[bool, typer.Option("--up/--down", help="Link state to set.")],
    nic: Annotated[str | None, typer.Option("--nic", help="One NIC (default: all).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Set the guest's network link(s) up or down (QMP set_link)."""
    from bam.actions.vm import set_link

    with user_errors():
        res = set_link(qmp, nic, up=up)
    _report(res, as_json)


@app.command("dump")
def dump_cmd(
    qmp: QmpArg,
    output: Annotated[Path, typer.Argument(help="File for the ELF memory dump.")],
    as_json: JsonOpt = False,
) -> None:
    """Dump the guest's memory (QMP dump-guest-memory, ELF) for investigation."""
    from bam.actions.vm import dump_memory

    with user_errors():
        res = dump_memory(qmp, output)
    _report(res, as_json)
