"""A synchronous QMP connection for sensors and actions, on top of PyPI ``qemu.qmp``.

Why a wrapper: ``qemu.qmp`` is asyncio-only, and its ``legacy`` sync shim installs an event
loop on the *calling* thread, which breaks as soon as the caller already runs one (the agent,
FastAPI, pytest-asyncio). Here the client lives on a private event loop in a daemon thread and
each call is handed over with ``run_coroutine_threadsafe``: callable from any thread, whether
or not that thread has its own loop. Errors become :class:`QmpError` naming the socket and
the command, so the CLI prints one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from bam.sensors.errors import SensorError, TargetGoneError


class QmpError(SensorError):
    """A QMP command failed, or the monitor cannot be reached."""


class Qmp:
    """One QMP session on a unix socket (``-qmp unix:PATH,server=on,wait=off``)."""

    def __init__(self, path: str | Path, *, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp:{self.path.name}", daemon=True
        )
        self._thread.start()
        self._client = QMPClient(f"bam:{self.path.name}")
        self._lock = threading.Lock()
        try:
            self._call(self._client.connect(str(self.path)), "connect")
        except BaseException:
            # let the client tear its half-open session down on its own loop first
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._client.disconnect(), self._loop).result(2.0)
            self._stop_loop()
            raise

    def _call(self, coro: Any, what: str, timeout: float | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout or self.timeout)
        except FutureTimeout:
            fut.cancel()
            if what == "connect":
                raise QmpError(
                    f"QMP {self.path}: connect timed out (QEMU serves one client per monitor "
                    "socket: is another one attached? a BAM guest has a second, qmp-ops.sock)"
                ) from None
            raise QmpError(f"QMP {self.path}: {what} timed out") from None
        except (QMPError, OSError) as e:
            if what == "connect":
                raise TargetGoneError(f"no QEMU monitor at {self.path}: {e}") from None
            raise QmpError(f"QMP {self.path}: {what} failed: {e}") from None

    def execute(
        self, cmd: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one QMP command and return its ``return`` value."""
        with self._lock:
            if self._loop.is_closed():
                raise QmpError(f"QMP {self.path}: connection closed")
            return self._call(self._client.execute(cmd, args), cmd, timeout)

    def status(self) -> str:
        """``running``, ``paused``, ``shutdown``, ... (``query-status``)."""
        return str(self.execute("query-status")["status"])

    def vcpu_threads(self) -> dict[int, int]:
        """vCPU index -> host thread id (``query-cpus-fast``)."""
        return {int(c["cpu-index"]): int(c["thread-id"]) for c in self.execute("query-cpus-fast")}

    def qemu_pid(self) -> int | None:
        """The QEMU process id, from the monitor socket's peer credentials."""
        import socket
        import struct

        transport = getattr(self._client, "_writer", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])

    def close(self) -> None:
        """Disconnect (QEMU keeps running; use :mod:`bam.actions.vm` to stop it)."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self._client.disconnect(), "disconnect", timeout=3.0)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=3.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
