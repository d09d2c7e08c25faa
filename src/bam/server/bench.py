"""``bam bench server``: N simulated agents, as separate processes, against a real server.

Each agent process enrols with its own fresh Ed25519 key, registers a workload, then loops:
build and sign the next token of its chain (real measurements of 24 files of its own process,
BAM's code digest, and a behaviour summary whose scores change every window), POST it over one
keep-alive connection, take the next nonce from the response (no token is signed before its
nonce is known). As a real agent does, it gives the 24 files by reference (their digest,
``files_sha256``) once the server has stored a token carrying them in full; ``files="full"``
sends them in every token instead. Latency is the client-side round trip of that POST. Figures are
measured after a warm-up, over the same wall-clock window in every agent.

The server runs as ``bam server run --workers W`` on loopback, over SQLite (WAL, in a
temporary directory) and over a throwaway PostgreSQL cluster; agents and server share this
machine's cores, so the figures are a floor for a server with cores of its own. To tell
the two apart the run also reports CPU milliseconds per evidence spent in the server processes
and in the agents (``server_cpu_ms_per_evidence``, ``agent_cpu_ms_per_evidence``): cores ÷ the
server figure is the throughput a dedicated machine of this speed would sustain.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import socket
import ssl
import statistics
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from bam.errors import BamError


class _LeanHttp:
    """One keep-alive HTTP/1.1 connection for the measured loop: a socket and httptools.

    The request is written as bytes and the response parsed by httptools (the parser uvicorn
    itself uses). httpx cost an agent ~1.5 ms of CPU per request and ``http.client`` (whose
    header parsing goes through ``email.parser``) ~0.5 ms; on a shared machine that CPU is taken
    from the server being measured. What the server receives is an ordinary request: the same
    headers ``http.client`` sends, a JSON body, keep-alive.
    """

    def __init__(self, url: str, verify: bool | str) -> None:
        u = urlsplit(url)
        self.tls = u.scheme == "https"
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (443 if self.tls else 80)
        self.ctx: ssl.SSLContext | None = None
        if self.tls:
            self.ctx = ssl.create_default_context(
                cafile=verify if isinstance(verify, str) else None
            )
            if verify is False:
                self.ctx.check_hostname = False
                self.ctx.verify_mode = ssl.CERT_NONE
        self.sock: socket.socket | None = None
        self._head = (
            f"Host: {self.host}:{self.port}\r\nAccept-Encoding: identity\r\n"
            "Content-Type: application/json\r\n"
        ).encode()
        self._body: list[bytes] = []
        self._done = False
        self._close = False

    def _connection(self) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=30.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ctx is not None:
                sock = self.ctx.wrap_socket(sock, server_hostname=self.host)
            self.sock = sock
        return self.sock

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"connection" and b"close" in value.lower():
            self._close = True

    def on_body(self, data: bytes) -> None:
        self._body.append(data)

    def on_message_complete(self) -> None:
        self._done = True

    def post_json(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        import httptools

        body = orjson.dumps(payload)
        sock = self._connection()
        sock.sendall(
            b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path.encode(), self._head, len(body), body)
        )
        parser = httptools.HttpResponseParser(self)
        self._body, self._done, self._close = [], False, False
        while not self._done:
            data = sock.recv(65536)
            if not data:
                self.reset()
                raise ConnectionError("the server closed the connection")
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as e:
                self.reset()
                raise ValueError(f"malformed HTTP response: {e}") from None
        # HTTP/1.1 keeps the connection unless the server says otherwise. (httptools'
        # ``should_keep_alive()`` is not usable here: read after the message it reports False,
        # which made every request open a new connection.)
        if self._close or parser.get_http_version() != "1.1":
            self.reset()
        return parser.get_status_code(), orjson.loads(b"".join(self._body))

    def reset(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _agent_main(
    url: str,
    token: str,
    name: str,
    verify: bool | str,
    warmup_s: float,
    duration_s: float,
    batch: int,
    by_reference: bool,
    ready: Connection,
    go: Event,
) -> None:
    import httpx

    from bam.evidence.claims import BehaviorCounts, Target
    from bam.evidence.keys.software import SoftwareSigner
    from bam.evidence.measure import collect_measurements, measure_process
    from bam.evidence.token import EvidenceBuilder
    from bam.server.client import AgentClient, tls_verify

    out: dict[str, Any] = {"latencies": [], "ok": 0, "errors": 0, "reasons": {}, "sent": 0}
    try:
        signer = SoftwareSigner.generate()
        proc = measure_process(os.getpid())
        names = [name] if batch == 1 else [f"{name}-{j:02d}" for j in range(batch)]
        measured_files = [
            collect_measurements(
                Target(kind="process", name=n, pid=proc.pid), files=proc.files[:24]
            )
            for n in names
        ]
        setup = httpx.Client(base_url=url, verify=tls_verify(verify), timeout=30.0)
        client = AgentClient(url, signer, client=setup)
        lean = _LeanHttp(url, verify)
        client.enrol(token, name)
        for n in names:
            client.register_workload(n, "process", 3600.0)
        nonces = client.challenges(batch)
        builder = EvidenceBuilder(signer)
        rng = random.Random()  # noqa: S311  (simulated scores, not secrets)
        counts = BehaviorCounts(new_processes=0, new_listening_ports=0, exec_mappings=0)
        ready.send("ready")
    except Exception as e:
        ready.send(f"error: {type(e).__name__}: {e}")
        return
    go.wait()
    start = time.time()
    measure_from, end = start + warmup_s, start + warmup_s + duration_s
    reasons: Counter[str] = Counter()
    window = 1_700_000_000.0
    cpu_from: float | None = None
    stored_files = False  # the server holds this agent's file lists (after one full batch)
    while True:
        now = time.time()
        if now >= end:
            break
        if cpu_from is None and now >= measure_from:
            cpu_from = time.process_time()
        window += 10.0
        tokens = []
        for nonce, measurements in zip(nonces, measured_files, strict=True):
            behavior = _behavior(rng, window, counts)
            ref = by_reference and stored_files
            tokens.append(
                builder.build(nonce, measurements, behavior, files_by_reference=ref).token
            )
        measured = now >= measure_from
        items: list[dict[str, Any]] = []
        stored: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        try:
            if batch == 1:
                status, data = lean.post_json("/v1/evidence", {"token": tokens[0]})
                items = [{"status": status, "evidence": data}] if status == 200 else []
            else:
                status, data = lean.post_json("/v1/evidence/batch", {"tokens": tokens})
                items = data["items"] if status == 200 else []
            dt = time.perf_counter() - t0
            stored = [it for it in items if it["status"] == 200]
            if len(stored) == batch:
                stored_files = True
                nonces = [it["evidence"]["next_challenge"]["nonce"] for it in stored]
                if measured:
                    out["latencies"].append(dt)
                    out["ok"] += batch
                continue
            failed = [it.get("reason", f"http_{it['status']}") for it in items if it not in stored]
            reason = failed[0] if failed else data.get("reason", f"http_{status}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            lean.reset()
            reason = type(e).__name__
        if reason == "measurements_unknown":
            stored_files = False
        if measured:
            out["ok"] += len(stored)
            out["errors"] += batch - len(stored)
            reasons[reason] += 1
        try:
            nonces = client.challenges(batch)
        except Exception:
            time.sleep(0.05)
    out["reasons"] = dict(reasons)
    out["cpu_s"] = time.process_time() - cpu_from if cpu_from is not None else 0.0
    lean.reset()
    setup.close()
    ready.send(out)


def _behavior(rng: random.Random, window: float, counts: Any) -> Any:
    """A behaviour summary whose scores change every window (as a live one's do)."""
    from bam.evidence.claims import BehaviorSummary

    return BehaviorSummary(
        window_start=window - 10.0,
        window_end=window,
        baseline_id="0" * 64,
        scores={
            "ngram": rng.uniform(0, 0.3),
            "hmm": rng.uniform(0, 8),
            "gmm": rng.uniform(0, 2),
        },
        thresholds={"ngram": 0.3, "hmm": 9.1, "gmm": 2.0},
        severity="none",
        label="normal",
        probability=round(rng.uniform(0.9, 1.0), 3),
        top_features=["openat->read", "read->close", "mmap->mprotect"],
        counts=counts,
        raw_log_sha256=f"{rng.getrandbits(256):064x}",
    )


class _ProcessTreeCpu:
    """CPU seconds (user + system) of a process group: the server and its workers (Linux)."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.tick = os.sysconf("SC_CLK_TCK")

    def read(self) -> float:
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            # fields[2] is the process group; fields[11], fields[12] are utime, stime (ticks).
            if int(fields[2]) == self.pgid:
                total += int(fields[11]) + int(fields[12])
        return total / self.tick


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


def _run_one(
    database: str,
    agents: int,
    duration_s: float,
    warmup_s: float,
    workers: int,
    tls: bool,
    batch: int = 1,
    files: str = "reference",
) -> dict[str, Any]:
    from contextlib import ExitStack

    from bam.server.harness import ServerProcess
    from bam.server.pgtemp import TempPostgres
    from bam.server.service import Service
    from bam.server.settings import ServerSettings
    from bam.server.tls import make_certificates

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bam-bench-")))
        env = {
            "BAM_SERVER_DIR": str(tmp / "server"),
            "BAM_AGENT_REQUESTS_PER_MINUTE": "100000000",
            "BAM_LOG_LEVEL": "warning",
            "BAM_STALE_CHECK_S": "30",
        }
        if database == "postgresql":
            pg = stack.enter_context(TempPostgres())
            env["BAM_DATABASE_URL"] = pg.url
        elif database != "sqlite":
            raise BamError(f"--database {database!r}: expected sqlite or postgresql")
        settings = ServerSettings(
            server_dir=tmp / "server", database_url=env.get("BAM_DATABASE_URL")
        )
        svc = Service(settings)
        tokens = [svc.create_enrol_token("bench")[0] for _ in range(agents)]
        viewer = svc.create_operator_token("bench-metrics", "viewer", "bench")
        svc.close()
        verify: bool | str = False
        if tls:
            paths = make_certificates(settings.tls_dir, ["127.0.0.1", "localhost"])
            verify = str(paths["ca"])
        srv = stack.enter_context(
            ServerProcess(env, workers=workers, tls=tls, log_path=tmp / "server.log")
        )
        ctx = mp.get_context("spawn")
        go = ctx.Event()
        pipes, procs = [], []
        for i in range(agents):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_agent_main,
                args=(
                    srv.url,
                    tokens[i],
                    f"bench-{i:03d}",
                    verify,
                    warmup_s,
                    duration_s,
                    batch,
                    files == "reference",
                    child,
                    go,
                ),
                daemon=True,
            )
            p.start()
            pipes.append(parent)
            procs.append(p)
        try:
            for pipe in pipes:
                if not pipe.poll(120):
                    raise BamError("an agent did not get ready within 120 s")
                msg = pipe.recv()
                if msg != "ready":
                    raise BamError(f"agent set-up failed: {msg}")
            server_cpu = _ProcessTreeCpu(srv.proc.pid if srv.proc else os.getpid())
            go.set()
            time.sleep(warmup_s)
            cpu_start = server_cpu.read()
            time.sleep(duration_s)
            server_cpu_s = server_cpu.read() - cpu_start
            results = []
            for pipe in pipes:
                if not pipe.poll(warmup_s + duration_s + 120):
                    raise BamError("an agent did not report")
                results.append(pipe.recv())
            counters = _scrape(srv.url, viewer, verify)
        except BaseException:  # interrupted or failed: the agents' results no longer matter
            for p in procs:
                p.kill()
            raise
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
        svc = Service(settings, run_migrations=False)
        stored = svc.counts()["evidence"]
        svc.close()
    latencies = sorted(x for r in results for x in r["latencies"])
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r["reasons"])
    ok = sum(r["ok"] for r in results)
    per = 1000.0 / max(ok, 1)
    return {
        "database": database,
        "agents": agents,
        "batch": batch,
        "files": files,
        "evidence_per_s": round(ok / duration_s, 1),
        "requests_per_s": round(len(latencies) / duration_s, 1),
        "p50_ms": round(_percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "errors": sum(r["errors"] for r in results),
        "error_reasons": dict(reasons),
        "measured": ok,
        "stored_total": stored,
        "workers": workers,
        "server_cpu_ms_per_evidence": round(server_cpu_s * per, 3),
        "agent_cpu_ms_per_evidence": round(sum(r["cpu_s"] for r in results) * per, 3),
        "duration_s": duration_s,
        "tls": tls,
        # whole run (warm-up included), from the server's /metrics
        "policy_cache_hit_rate": _ratio(
            counters.get("bam_policy_cache_total{result=hit}", 0.0),
            counters.get("bam_policy_cache_total{result=hit}", 0.0)
            + counters.get("bam_policy_cache_total{result=miss}", 0.0),
        ),
        "evidence_per_sqlite_commit": _ratio(
            counters.get("bam_sqlite_group_commit_units_total", 0.0),
            counters.get("bam_sqlite_group_commits_total", 0.0),
        ),
    }


def _scrape(url: str, token: str, verify: bool | str) -> dict[str, float]:
    """The server's counters (``name{label=value}`` → value), summed over its workers."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from bam.server.client import tls_verify

    r = httpx.get(
        f"{url}/metrics",
        headers={"Authorization": f"Bearer {token}"},
        verify=tls_verify(verify),
        timeout=30.0,
    )
    r.raise_for_status()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            out[key] = out.get(key, 0.0) + sample.value
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def bench_server(
    databases: list[str] | tuple[str, ...] = ("sqlite", "postgresql"),
    agents: int = 4,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    workers: int = 2,
    tls: bool = False,
    batches: list[int] | tuple[int, ...] = (1,),
    rounds: int = 1,
    files: list[str] | tuple[str, ...] = ("reference",),
) -> dict[str, Any]:
    """One run per database and batch size, ``rounds`` times over.

    Shape ``{"runs": [{database, agents, batch, evidence_per_s, p50_ms, p99_ms, errors, ...}],
    "summary": [...]}``; with ``batch`` > 1 each agent watches that many workloads and sends
    one token per workload per request (``POST /v1/evidence/batch``); latency is then per
    request. ``files``: ``reference`` (each agent's file lists by digest once stored, as agents
    send them) and/or ``full`` (every token carries its 24 files). Rounds run the whole set again *interleaved* (all configurations once, then again),
    so that a shared machine's slow and fast minutes fall on every configuration alike;
    ``summary`` gives each configuration's median and range over the rounds.
    """
    for k in batches:
        if not 1 <= k <= 64:
            raise BamError(f"--batch {k}: expected 1 to 64 tokens per request")
    if rounds < 1:
        raise BamError(f"--rounds {rounds}: expected at least 1")
    for mode in files:
        if mode not in ("reference", "full"):
            raise BamError(f"--files {mode!r}: expected reference or full")
    runs = []
    for r in range(rounds):
        for db in databases:
            for k in batches:
                for mode in files:
                    run = _run_one(db, agents, duration_s, warmup_s, workers, tls, k, mode)
                    run["round"] = r + 1
                    runs.append(run)
    return {"runs": runs, "summary": _summary(runs), "cpus": os.cpu_count()}


def _summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median (and range) of each (database, batch, files) configuration over its rounds."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["database"], run["batch"], run["files"]), []).append(run)
    out = []
    for (db, batch, files), rs in groups.items():
        rate = [r["evidence_per_s"] for r in rs]
        p99 = [r["p99_ms"] for r in rs]
        out.append(
            {
                "database": db,
                "batch": batch,
                "files": files,
                "rounds": len(rs),
                "evidence_per_s_median": round(statistics.median(rate), 1),
                "evidence_per_s_range": [min(rate), max(rate)],
                "p99_ms_median": round(statistics.median(p99), 2),
                "p99_ms_max": max(p99),
                "errors": sum(r["errors"] for r in rs),
            }
        )
    return out
