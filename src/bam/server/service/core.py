"""The plumbing every part of the service shares: engine, keys, settings, audit rows.

:class:`ServiceCore` owns the database engine, the server's signing key and the settings; the
other modules of :mod:`bam.server.service` are mixins over it, each doing one thing
(enrolment, evidence, policies, operators, secrets, ...). Keeping the plumbing here is what
lets those modules stay small without each re-opening the database.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, RowMapping, bindparam, insert, select

from bam.evidence.claims import FileMeasurement
from bam.evidence.keys.base import VerificationKey
from bam.evidence.keys.software import SoftwareSigner
from bam.server import metrics
from bam.server.db import hot
from bam.server.db import models as m
from bam.server.db.engine import make_engine, migrate
from bam.server.db.groupcommit import LoopGroupCommitter
from bam.server.errors import ServerError
from bam.server.keys import load_server_signer
from bam.server.policy import PolicyVersion
from bam.server.settings import ServerSettings

A, T, W, N, E, R, AC, AU, P, S, OT, TI = (
    m.table(model)
    for model in (
        m.Agent,
        m.EnrolToken,
        m.Workload,
        m.Nonce,
        m.Evidence,
        m.Result,
        m.Action,
        m.Audit,
        m.Policy,
        m.Secret,
        m.OperatorToken,
        m.IntelIndicator,
    )
)

# Prebuilt statements: executing one with a parameter dict skips SQLAlchemy's per-call
# construction and cache-key work (most of its cost per statement).
SEL_AGENT_BY_KID = select(A).where(A.c.kid == bindparam("kid"))
INS_AUDIT = insert(AU)


def dumps(value: object) -> str:
    """Canonical compact JSON, as stored in text columns."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def nonce_hash(nonce: str) -> str:
    """Nonces are stored and looked up by digest: the table never holds a usable nonce."""
    return hashlib.sha256(nonce.encode("utf-8", "surrogatepass")).hexdigest()


class LoopDb:
    """An event loop's own SQLite connections: one for the evidence path's reads, one writer.

    Both are detached from the pool (they live as long as the loop; the writer's busy timeout
    is changed) and used only on the loop's thread, one statement sequence at a time.
    """

    def __init__(self, engine: Engine, lock_path: Path) -> None:
        self._reader = engine.raw_connection()
        self._reader.detach()
        self.cursor = self._reader.cursor()
        writer = engine.raw_connection()
        writer.detach()
        self.committer = LoopGroupCommitter(
            writer, lock_path=lock_path, observe=metrics.observe_group_commit
        )

    def close(self) -> None:
        self.committer.close()
        self._reader.close()


class ServiceCore:
    """Engine, server key, settings, and the helpers every operation uses."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        engine: Engine | None = None,
        signer: SoftwareSigner | None = None,
        run_migrations: bool = True,
    ) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings.url, synchronous=settings.sqlite_synchronous)
        if run_migrations:
            migrate(self.engine)
        self.signer = signer or load_server_signer(settings.key_dir)
        self.server_key = VerificationKey.from_signer(self.signer)
        self._keys: dict[str, VerificationKey] = {}
        self._policy: tuple[float, PolicyVersion] | None = None
        # (checked at, table version, sha256 -> indicators): see bam.server.service.intel
        self._intel: (
            tuple[float, tuple[Any, ...], dict[str, list[tuple[str, str, float | None]]]] | None
        ) = None
        # sha256 -> measured files stored under it: see bam.server.service.file_sets
        self._file_sets: OrderedDict[str, tuple[FileMeasurement, ...]] = OrderedDict()
        self._policy_lock = threading.Lock()
        self._hot = hot.Statements(self.engine.dialect.name)
        # Per event-loop thread (one per uvicorn worker), for the evidence path on SQLite.
        self._loop_dbs: dict[int, LoopDb] = {}

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads (SQLite: a deferred transaction, no write lock)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(bam_readonly=True)
            try:
                yield conn
            finally:
                conn.rollback()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (SQLite: BEGIN IMMEDIATE), committed on success."""
        with self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        for db in self._loop_dbs.values():
            db.close()
        self._loop_dbs.clear()
        self.engine.dispose()

    def _loop_db(self) -> LoopDb | None:
        """The calling event loop's SQLite connections and group committer (made on first use).

        ``None`` when the database is not an SQLite file (PostgreSQL; in-memory SQLite, whose
        connections would not share one database).
        """
        db = self.engine.url.database or ""
        if self.engine.dialect.name != "sqlite" or db in ("", ":memory:"):
            return None
        ident = threading.get_ident()
        found = self._loop_dbs.get(ident)
        if found is None:
            found = self._loop_dbs[ident] = LoopDb(self.engine, Path(f"{db}-writer.lock"))
        return found

    def audit(
        self,
        conn: Connection,
        actor: str,
        event: str,
        workload: str | None,
        detail: dict[str, Any],
        now: float | None = None,
    ) -> None:
        """One audit row, in the caller's transaction (so it commits or vanishes with it)."""
        conn.execute(
            INS_AUDIT,
            {
                "at": now or time.time(),
                "actor": actor[:160],
                "event": event,
                "workload": workload,
                "detail": dumps(detail),
            },
        )

    def _vk(self, jwk_text: str) -> VerificationKey:
        """The verification key of a stored JWK, parsed once per process."""
        vk = self._keys.get(jwk_text)
        if vk is None:
            vk = VerificationKey.from_jwk(json.loads(jwk_text))
            if len(self._keys) > 50_000:
                self._keys.clear()
            self._keys[jwk_text] = vk
        return vk

    def _workload_row(self, conn: Connection, name: str) -> RowMapping:
        row = conn.execute(select(W).where(W.c.name == name)).mappings().first()
        if row is None:
            raise ServerError(404, "workload_unknown", f"no workload named {name!r}")
        return row
