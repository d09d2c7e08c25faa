"""Regenerate ``src/bam/data/syscalls_*.json`` from the kernel UAPI headers.

Run on a Debian host with ``linux-libc-dev`` installed::

    python tools/gen_syscall_tables.py /usr/include/x86_64-linux-gnu/asm

The tables are facts about the Linux ABI (name -> number); they are shipped as JSON so that
BAM does not need kernel headers at run time.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_LINE = re.compile(r"^#define\s+__NR_(\w+)\s+(\d+)\s*$")


def parse(header: Path) -> dict[str, int]:
    table: dict[str, int] = {}
    for line in header.read_text().splitlines():
        m = _LINE.match(line)
        if m:
            table[m.group(1)] = int(m.group(2))
    return table


def main() -> None:
    asm = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/include/x86_64-linux-gnu/asm")
    out = Path(__file__).resolve().parent.parent / "src" / "bam" / "data"
    for arch, name in (("x86_64", "unistd_64.h"), ("i386", "unistd_32.h")):
        table = parse(asm / name)
        (out / f"syscalls_{arch}.json").write_text(
            json.dumps(table, indent=0, sort_keys=True) + "\n"
        )
        print(arch, len(table))


if __name__ == "__main__":
    main()
