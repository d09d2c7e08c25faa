"""Engine set-up for SQLite (WAL) and PostgreSQL, and schema migration at start-up.

SQLite: WAL lets readers run beside the one writer; ``busy_timeout`` makes a writer wait for the
lock instead of failing; and write transactions start with ``BEGIN IMMEDIATE`` so that two
processes never both read and then try to upgrade to a write lock (SQLite's "database is locked"
deadlock). pysqlite's own transaction handling is switched off for that (``isolation_level=None``).

PostgreSQL: psycopg 3; the default READ COMMITTED is enough because every decision that two
replicas could race on is a single conditional UPDATE or a unique constraint.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x62616D  # pg_advisory_lock key ("bam")


def make_engine(url: str, *, synchronous: str = "NORMAL", pool_size: int = 8) -> Engine:
    """An engine for ``url``; SQLite files get their directory (0700) and pragmas."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        db = u.database or ""
        if db and db != ":memory:":
            Path(db).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        _sqlite_events(engine, synchronous)
        return engine
    return create_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_recycle=1800
    )


def _sqlite_events(engine: Engine, synchronous: str) -> None:
    if synchronous not in ("NORMAL", "FULL"):
        raise ValueError("synchronous must be NORMAL or FULL")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Write transactions take the write lock up front (see the module docstring). Reads
        # marked ``bam_readonly`` run in autocommit: each statement sees a consistent snapshot,
        # which is all they need, and they skip a BEGIN/ROLLBACK round per request.
        if not conn.get_execution_options().get("bam_readonly"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection | None]:
    """One migrator at a time, across processes: an advisory lock (PostgreSQL) or a file lock."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
            try:
                yield None
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
        return
    db = engine.url.database or ""
    if not db or db == ":memory:":
        yield None
        return
    fd = os.open(f"{db}.migrate.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield None
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent; safe with several replicas)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with _migration_lock(engine), engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (``None``: not initialised)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
