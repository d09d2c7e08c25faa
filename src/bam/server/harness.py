"""Start and stop a real ``bam server`` process on a free loopback port (tests, benchmark).

The server runs as a child process in its own session with its settings in the environment,
so a test or benchmark talks to it over real HTTP exactly like an agent would, can kill it
(crash) and start it again, and never leaves it running: :meth:`ServerProcess.stop` kills the
whole process group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from bam.errors import BamError
from bam.server.pgtemp import free_port


class ServerStartError(BamError):
    """The server process exited or did not answer in time."""


class ServerProcess:
    """``with ServerProcess(env) as srv: srv.url``."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        workers: int = 1,
        port: int | None = None,
        tls: bool = False,
        log_path: Path | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.env = {**os.environ, **env}
        self.workers = workers
        self.port = port or free_port()
        self.tls = tls
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: int | None = None
        # the workers' shared metric files are ours when the caller names none, so a killed
        # server (no clean exit of its own) leaves nothing behind once we stop it
        self._own_metrics = workers > 1 and not self.env.get("PROMETHEUS_MULTIPROC_DIR")
        self._metrics_dir: str | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        if self._own_metrics and self._metrics_dir is None:
            self._metrics_dir = tempfile.mkdtemp(prefix="bam-metrics-")
            self.env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        cmd = [
            sys.executable,
            "-c",
            "from bam.cli import main; main()",
            "server",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--tls" if self.tls else "--no-tls",
        ]
        out: int = subprocess.DEVNULL
        if self.log_path is not None:
            self._log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            out = self._log
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:  # failed, or interrupted (Ctrl-C, SIGTERM) while starting:
            self.stop()  # it is not the caller's yet, so never leave it running
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        verify: bool | str = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"server exited with {self.proc.returncode}{self._tail()}")
            try:
                r = httpx.get(f"{self.url}/healthz", timeout=1.0, verify=verify)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise ServerStartError(
            f"server did not answer within {self.ready_timeout_s:.0f} s{self._tail()}"
        )

    def _tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return ":\n" + self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def kill(self) -> None:
        """Crash it: SIGKILL to the whole process group (no graceful shutdown)."""
        self._signal(signal.SIGKILL)
        self._reap(10.0)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left."""
        self._signal(signal.SIGTERM)
        if not self._reap(timeout_s):
            self._signal(signal.SIGKILL)
            self._reap(5.0)
        if self._log is not None:
            os.close(self._log)
            self._log = None
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = None

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def _reap(self, timeout_s: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        # Workers of a multi-worker server are in the same group: make sure none survives.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        return True

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
