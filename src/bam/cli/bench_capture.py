"""``bam bench capture``: system-call capture cost of each backend, side by side.

Prints, per backend and workload, the wall-time and workload-CPU slowdowns (each run against
the no-sensor run just before it), events expected vs captured, drops and the sensor's own CPU (``--json``: ``{"backends": {NAME: {"workloads": {WL: {...}}}}}``).
Needs root for the kernel backends; strace runs anywhere.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from bam.cli._common import console, err_console, print_json, user_errors
from bam.cli.bench import app as bench_app


@bench_app.command("capture")
def capture_cmd(
    calls: Annotated[
        int, typer.Option("--calls", help="Tiny syscalls in the heavy run.")
    ] = 1_000_000,
    io_blocks: Annotated[
        int, typer.Option("--io-blocks", help="4 KiB blocks written then read (python_io).")
    ] = 20_000,
    repeats: Annotated[int, typer.Option("--repeats", help="Runs per backend (median).")] = 5,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            "--backend",
            help="ebpf, ebpf-agg, tracefs, strace (ebpf-precise: on request); repeatable.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Measure each capture backend's cost on tiny syscalls, Python file I/O and tar czf."""
    from bam.sensors.bench import bench_capture

    with user_errors():
        res = bench_capture(
            calls=calls,
            io_blocks=io_blocks,
            repeats=repeats,
            backends=backend,
            progress=None if as_json else (lambda m: err_console.print(m, style="dim")),
        )
    if as_json:
        print_json(res)
        return
    t = Table(title="system-call capture cost (median wall time; slowdown vs no sensor)")
    cols = ("backend", "workload", "slowdown", "CPU slowdown", "captured", "expected", "drops")
    for col in (*cols, "sensor CPU s"):
        t.add_column(col)
    for b, v in res["backends"].items():
        if b == "none":
            continue
        for w, e in v["workloads"].items():
            t.add_row(
                b,
                w,
                f"{e['slowdown']:.2f}x",
                f"{e['cpu_slowdown']:.2f}x" if "cpu_slowdown" in e else "-",
                str(e["captured"]),
                str(e["expected"]),
                str(e["drops"]),
                f"{e['sensor_cpu_s']:.3f}",
            )
    console.print(t)
    for b, why in res.get("skipped", {}).items():
        err_console.print(f"skipped {b}: {why}", highlight=False)
