"""An embedded attestation server for ``bam watch`` and ``bam demo``: SQLite in a directory,
loopback only, no TLS, an admin token made on the spot.

``in_process=True`` runs uvicorn in a thread of this process (one process to start and stop,
what ``bam watch`` wants); ``False`` starts it as a child process
(:class:`~bam.server.harness.ServerProcess`) so that the agent's own CPU and memory can be
measured without the server's (what ``bam demo`` reports).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from bam.errors import BamError
from bam.server.client import OperatorClient
from bam.server.pgtemp import free_port


class EmbeddedServer:
    def __init__(
        self, root: Path, *, policy_source: str | None = None, in_process: bool = True
    ) -> None:
        self.root = root
        self.policy_source = policy_source
        self.in_process = in_process
        self.port = free_port()
        self.admin_token = ""
        self.policy_id: str | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._proc: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        return {
            "BAM_SERVER_DIR": str(self.root / "server"),
            "BAM_TLS": "false",
            "BAM_LOG_LEVEL": "warning",
            "BAM_POLICY_REFRESH_S": "0",
        }

    def start(self) -> EmbeddedServer:
        if self.in_process:
            self._start_thread()
        else:
            self._start_child()
        if self.policy_source is not None:
            # through the API, like an operator: validated by the server, versioned, audited
            with self.operator() as op:
                out = op.put("/v1/policy", {"source": self.policy_source, "name": "bam-demo"})
            self.policy_id = str(out["policy_id"])
        return self

    def _start_thread(self) -> None:
        import uvicorn

        from bam.server.app import create_app
        from bam.server.service import Service
        from bam.server.settings import ServerSettings

        settings = ServerSettings(
            server_dir=self.root / "server", tls=False, port=self.port, host="127.0.0.1"
        )
        svc = Service(settings)
        try:
            self.admin_token = svc.create_operator_token("embedded-admin", "admin", "embedded")
        finally:
            svc.close()
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, name="bam-embedded-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise BamError("the embedded server did not start")
            time.sleep(0.05)

    def _start_child(self) -> None:
        """Everything server-side happens in child processes: this process never imports
        the server's database or policy engine (they would count as the agent's memory)."""
        import json
        import os
        import subprocess
        import sys

        from bam.server.harness import ServerProcess

        env = {**os.environ, **self._env()}
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from bam.cli import main; main()",
                "server",
                "token",
                "create",
                "--operator",
                "embedded-admin",
                "--role",
                "admin",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if out.returncode != 0:
            raise BamError(f"could not create the embedded server's admin token: {out.stderr}")
        self.admin_token = str(json.loads(out.stdout)["token"])
        self._proc = ServerProcess(
            {**self._env(), "BAM_PORT": str(self.port)},
            port=self.port,
            log_path=self.root / "server.log",
        ).start()

    def operator(self) -> OperatorClient:
        return OperatorClient(self.url, self.admin_token)

    def enrol_token(self, note: str = "embedded agent") -> str:
        with self.operator() as op:
            return str(op.post("/v1/admin/enrol-tokens", {"note": note})["token"])

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = None
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
