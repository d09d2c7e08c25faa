"""``notes`` — a deliberately flawed little web service for BAM's demo. DO NOT DEPLOY.

A single-threaded HTTP app (standard library only) that serves notes from a directory. Its
``/size`` endpoint runs ``wc -c <name>`` through a shell with the user's input pasted into
the command line — the classic command-injection flaw (CWE-78): ``name=a.txt;anything`` runs
*anything* as the service. Benign use spawns a shell too, so the baseline BAM learns includes
"the service runs sh and wc"; what it has never seen is what an attacker's shell does.

Run: ``python -m bam.demo.service --port 8080 --data DIR`` (binds 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse


class Handler(BaseHTTPRequestHandler):
    data: Path = Path(".")
    server_version = "notes/0.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        q = parse_qs(url.query)
        if url.path == "/":
            self._send(200, b"<h1>notes</h1><a href=/notes>notes</a>", "text/html")
        elif url.path == "/notes":
            names = sorted(p.name for p in self.data.glob("*.txt"))
            self._send(200, json.dumps(names).encode())
        elif url.path == "/note":
            name = Path(q.get("name", [""])[0]).name
            p = self.data / name
            if p.is_file():
                self._send(200, p.read_bytes(), "text/plain")
            else:
                self._send(404, b'{"error": "no such note"}')
        elif url.path == "/size":
            name = q.get("name", [""])[0]
            # THE FLAW: user input inside a shell command line.
            out = subprocess.run(  # noqa: S602
                f"wc -c {name}", shell=True, cwd=self.data, capture_output=True, timeout=30
            )
            self._send(200, json.dumps({"wc": out.stdout.decode(errors="replace")}).encode())
        else:
            self._send(404, b'{"error": "not found"}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--data", type=Path, required=True)
    a = ap.parse_args()
    a.data.mkdir(parents=True, exist_ok=True)
    Handler.data = a.data
    HTTPServer(("127.0.0.1", a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
