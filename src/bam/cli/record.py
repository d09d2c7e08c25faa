"""``bam record``: record a workload's system calls into BAM's recording format.

``bam record -o run.bamrec -- CMD ARGS`` starts CMD under the best available sensor (eBPF,
else tracefs, else strace; ``--backend`` to choose) and records it and its children until it
exits; ``--pid P`` (repeatable) or ``--cgroup C`` record running processes until they exit,
``--duration`` passes or Ctrl-C; ``--vm QMP_SOCKET`` records a QEMU guest started by ``bam vm
start`` (its in-guest system calls from the guest's tracefs stream, plus host-side resource
samples) until ``--duration``, the guest's workload ends, QEMU exits or Ctrl-C. The recording
says which backend ran and how many events it lost; a recording with losses is kept (and
marked) rather than discarded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bam.cli import app as root
from bam.cli._common import console, err_console, print_json, user_errors


@root.command(
    "record",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def record_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="Recording file to write.")],
    command: Annotated[
        list[str] | None, typer.Argument(help="Command to start and record (after --).")
    ] = None,
    pid: Annotated[
        list[int] | None,
        typer.Option("--pid", help="Record this running process and its descendants; repeatable."),
    ] = None,
    cgroup: Annotated[
        str | None,
        typer.Option("--cgroup", help="Record a cgroup (v2 path, or a v1 group's path)."),
    ] = None,
    vm: Annotated[
        Path | None,
        typer.Option("--vm", help="Record a QEMU guest: its QMP socket (from `bam vm start`)."),
    ] = None,
    from_boot: Annotated[
        bool, typer.Option("--from-boot", help="--vm: include the guest's events since boot.")
    ] = False,
    backend: Annotated[
        str, typer.Option("--backend", help="auto, ebpf, tracefs or strace.")
    ] = "auto",
    duration: Annotated[
        float | None,
        typer.Option("--duration", help="Stop after this many seconds (--pid/--cgroup/--vm)."),
    ] = None,
    returns: Annotated[
        bool, typer.Option("--returns", help="Also record return values (eBPF: adds sys_exit).")
    ] = False,
    label: Annotated[
        str | None, typer.Option("--label", help="Label stored in the recording.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Record system calls of a command, processes or a cgroup to a .bamrec file."""
    from bam.sensors.errors import SensorError
    from bam.sensors.record import record_command, record_target
    from bam.sensors.workload import Target
    from bam.traces.recording import write_recording

    with user_errors():
        given = sum(bool(x) for x in (command, pid, cgroup, vm))
        if given != 1:
            raise SensorError("give exactly one of: -- CMD, --pid P, --cgroup C, --vm QMP")
        if not output.parent.is_dir():
            raise SensorError(f"output folder {output.parent} does not exist")
        if vm is not None:
            _record_vm(
                vm, output, duration=duration, from_boot=from_boot, label=label, as_json=as_json
            )
            return
        if command:
            rec = record_command(command, backend=backend, returns=returns)
        else:
            target = Target.from_pids(pid) if pid else Target.from_cgroup(cgroup or "")
            rec = record_target(target, backend=backend, duration=duration, returns=returns)
        trace = rec.to_trace(output.name, label=label)
        write_recording(output, trace, command=command)
        summary = {**rec.summary(), "output": str(output)}
        if as_json:
            print_json(summary)
        else:
            c = rec.capture
            state = "complete" if c.complete else f"[bold red]{c.drops} events lost[/]"
            console.print(
                f"recorded {len(c)} system calls from {summary['threads']} threads with "
                f"[bold]{c.backend}[/] ({state}) -> {output}",
                highlight=False,
            )
            if rec.choice.skipped:
                err_console.print(f"backend: {rec.choice.describe()}", highlight=False)
            if rec.exit_code:
                err_console.print(f"command exited with status {rec.exit_code}", highlight=False)


def _record_vm(
    qmp: Path,
    output: Path,
    *,
    duration: float | None,
    from_boot: bool,
    label: str | None,
    as_json: bool,
) -> None:
    """``--vm``: guest syscalls + host-side samples into one recording."""
    from bam.sensors.vm.record import record_vm
    from bam.traces.recording import write_recording

    rec = record_vm(qmp, duration=duration, from_start=from_boot)
    write_recording(output, rec.to_trace(output.name, label=label))
    summary = {**rec.summary(), "output": str(output)}
    if as_json:
        print_json(summary)
        return
    c = rec.capture
    state = "complete" if c.complete else f"[bold red]{c.drops} events lost[/]"
    console.print(
        f"recorded {len(c)} guest system calls from {summary['threads']} guest threads "
        f"({state}; {summary['samples']} host samples; ended: {rec.reason}) -> {output}",
        highlight=False,
    )
