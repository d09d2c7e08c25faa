"""``bam classifier train|predict`` on strace recordings of real runs made here."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bam.cli import app
from conftest import require_tool

# One small program, three behaviours: plain file work, or the same plus a spawned shell,
# or the same plus a TCP connection that sends data.
PROGRAM = """
import os, socket, subprocess, sys, tempfile
mode, n, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d = tempfile.mkdtemp()
for i in range(n):
    p = os.path.join(d, f"f{i}")
    with open(p, "w") as f:
        f.write("x" * (100 * (i + 1)))
    with open(p) as f:
        f.read()
    os.unlink(p)
if mode == "shell":
    subprocess.run(["/bin/sh", "-c", "id"], stdout=subprocess.DEVNULL, check=False)
elif mode == "connect":
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"hello" * n)
    s.close()
os.rmdir(d)
"""


STRACE = ("strace", "-f", "-ttt", "-o")


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            c.recv(65536)
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    srv.close()


def _record(out: Path, mode: str, n: int, port: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{mode}-{n}.strace"
    subprocess.run(
        [*STRACE, str(log), sys.executable, "-B", "-s", "-c", PROGRAM, mode, str(n), str(port)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return log


def test_train_then_predict_names_the_family(tmp_path: Path, listener: int) -> None:
    require_tool("strace")
    train, test = tmp_path / "train", tmp_path / "test"
    for mode in ("benign", "shell", "connect"):
        for n in range(1, 7):
            _record(train / mode, mode, n, listener)
        _record(test / mode, mode, 9, listener)
    model = tmp_path / "clf"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "classifier",
            "train",
            "-o",
            str(model),
            "--benign",
            str(train / "benign"),
            "--attack",
            f"shell={train / 'shell'}",
            "--attack",
            f"connect={train / 'connect'}",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    trained = json.loads(res.output)
    assert trained["classes"] == ["connect", "normal", "shell"]
    assert trained["traces"] == {"connect": 6, "normal": 6, "shell": 6}
    res = runner.invoke(
        app,
        [
            "classifier",
            "predict",
            str(model),
            *(str(test / m) for m in ("benign", "shell", "connect")),
            "--expect-model-id",
            trained["model_id"],
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = {Path(r["trace"]).name.split("-")[0]: r for r in json.loads(res.output)["traces"]}
    assert rows["benign"]["label"] == "normal", rows
    assert rows["shell"]["label"] == "shell", rows
    assert rows["connect"]["label"] == "connect", rows
    assert rows["benign"]["attack_probability"] < 0.5 < rows["shell"]["attack_probability"]


def test_train_refuses_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app, ["classifier", "train", "-o", str(tmp_path / "m"), "--attack", "noequals"]
    )
    assert res.exit_code != 0
    assert "FAMILY=PATH" in res.output
    res = runner.invoke(
        app, ["classifier", "train", "-o", str(tmp_path / "m"), "--benign", str(tmp_path / "nope")]
    )
    assert res.exit_code != 0
    assert "no such file" in res.output
    assert not (tmp_path / "m").exists()
