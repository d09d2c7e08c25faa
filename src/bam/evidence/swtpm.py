"""Run a throw-away swtpm (software TPM 2.0) on loopback, for tests, benchmarks and demos.

The emulator gets its own state directory and two free TCP ports (commands on ``port``,
control on ``port + 1``, as the ``swtpm`` TCTI expects). ``--flags not-need-init,startup-clear``
makes it ready without ``swtpm_setup`` (no EK certificate, no CA written under /var/lib).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from bam.evidence.errors import TpmError


def _free_port_pair(host: str) -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind((host, 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind((host, port + 1))
                except OSError:
                    continue
            return int(port)
    raise TpmError("tpm_unavailable", "no two consecutive free TCP ports on loopback")


class Swtpm:
    """A swtpm process; ``with Swtpm() as tpm: TpmDevice(tpm.tcti)``."""

    def __init__(self, state_dir: str | Path | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bam-swtpm-")
            state_dir = self._tmp.name
        self.state_dir = Path(state_dir)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    def start(self, timeout: float = 10.0) -> Self:
        exe = shutil.which("swtpm")
        if exe is None:
            raise TpmError("tpm_unavailable", "swtpm is not installed (apt-get install swtpm)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = _free_port_pair(self.host)
            self._proc = subprocess.Popen(
                [
                    exe, "socket", "--tpm2",
                    "--tpmstate", f"dir={self.state_dir}",
                    "--server", f"type=tcp,port={self.port},bindaddr={self.host}",
                    "--ctrl", f"type=tcp,port={self.port + 1},bindaddr={self.host}",
                    "--flags", "not-need-init,startup-clear",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise TpmError("tpm_unavailable", "swtpm did not start listening on loopback")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False  # exited: port taken in the meantime, retry on another
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.01)
        return False

    def stop(self) -> None:
        """Terminate the emulator (its state stays in ``state_dir``)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> Self:
        """Stop and start again on the same state: a TPM reset (resetCount + 1)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
