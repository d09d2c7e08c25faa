"""A throwaway PostgreSQL cluster (tests and ``bam bench server``): initdb, start, drop.

PostgreSQL refuses to run as root, so when we are root the cluster belongs to the
``postgres`` user and its commands run through ``runuser``. The cluster listens on loopback on
a free port with its socket in its own directory, uses ``trust`` authentication on loopback
only, and is stopped (``immediate``) and deleted on exit — nothing is left running.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from bam.errors import BamError


class PostgresUnavailableError(BamError):
    """No PostgreSQL server binaries here, or the cluster would not start."""


def pg_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (newest major version), if any."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    for d in reversed(dirs):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TempPostgres:
    """``with TempPostgres() as pg: pg.url`` — a fresh database for the duration."""

    def __init__(self, base: Path | None = None) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise PostgresUnavailableError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bindir = bindir
        self.base = base
        self.port = free_port()
        self.root: Path | None = None
        self.user: str | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user or 'postgres'}@127.0.0.1:{self.port}/bam"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> TempPostgres:
        self.root = Path(tempfile.mkdtemp(prefix="bam-pg-", dir=self.base))
        data, sock = self.root / "data", self.root / "sock"
        sock.mkdir()
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailableError(
                    "running as root but there is no postgres user"
                ) from None
            os.chmod(self.root, 0o755)  # noqa: S103  (postgres must traverse it)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            os.chown(sock, pw.pw_uid, pw.pw_gid)
            self.user = "postgres"
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        r = self._run(
            "initdb",
            "-D",
            str(data),
            "-U",
            self.user,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        if r.returncode != 0:
            self.stop()
            raise PostgresUnavailableError(
                f"initdb failed: {(r.stderr or r.stdout).strip()[-500:]}"
            )
        opts = (
            f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200 "
            "-c shared_buffers=64MB"
        )
        r = self._run(
            "pg_ctl",
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "30",
            "start",
        )
        if r.returncode != 0:
            log = ""
            with contextlib.suppress(OSError):
                log = (self.root / "log").read_text()[-800:]
            self.stop()
            raise PostgresUnavailableError(f"pg_ctl start failed: {r.stderr.strip()[-300:]} {log}")
        self._started = True
        deadline = time.monotonic() + 20
        while True:
            r = self._run(
                "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "bam"
            )
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresUnavailableError(f"createdb failed: {r.stderr.strip()[-300:]}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        if self._started:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
