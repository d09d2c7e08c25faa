"""Stored Rego policies: the shipped default, validated uploads, the version in force.

Versions only ever increase; the version in force is the highest, cached per process for
``policy_refresh_s`` (a replica notices another replica's upload within that time).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import Connection, RowMapping, func, insert, select

from bam.server.errors import ServerError
from bam.server.policy import DEFAULT_NAME, PolicyVersion, default_source, validate
from bam.server.service.core import P, ServiceCore

log = logging.getLogger("bam.server")


class PoliciesMixin(ServiceCore):
    """Policy versions: store, validate, select the one in force."""

    def ensure_default_policy(self) -> None:
        """Store the shipped policy as version 1 when no policy exists yet."""
        with self.read() as conn:
            exists = conn.execute(select(P.c.id).limit(1)).first()
        if exists is not None:
            return
        source = default_source()
        try:
            with self.write() as conn:
                if conn.execute(select(P.c.id).limit(1)).first() is None:
                    self._insert_policy(conn, DEFAULT_NAME, source, "system", time.time())
        except Exception:  # another replica stored it first (unique name+version)
            log.debug("default policy already stored by another process")

    def _insert_policy(
        self, conn: Connection, name: str, source: str, actor: str, now: float
    ) -> PolicyVersion:
        top = conn.execute(select(func.max(P.c.version))).scalar()
        pv = PolicyVersion(name=name, version=(top or 0) + 1, source=source)
        conn.execute(
            insert(P).values(
                name=pv.name,
                version=pv.version,
                sha256=pv.sha256,
                source=source,
                created_at=now,
                created_by=actor,
            )
        )
        self.audit(
            conn,
            actor,
            "policy_set",
            None,
            {"policy_id": pv.policy_id, "sha256": pv.sha256},
            now,
        )
        return pv

    def set_policy(self, source: str, actor: str, name: str = "bam") -> tuple[PolicyVersion, float]:
        """Validate (compile and test-evaluate) ``source`` and store it as the next version.

        A broken policy raises :class:`PolicyError` with the Rego error and is never stored.
        """
        validate(source, name)
        now = time.time()
        with self.write() as conn:
            pv = self._insert_policy(conn, name, source, actor, now)
        with self._policy_lock:
            self._policy = (time.monotonic(), pv)
        return pv, now

    def active_policy(self) -> PolicyVersion:
        """The policy in force (highest version), cached for ``policy_refresh_s``."""
        cached = self._policy
        if cached is not None and time.monotonic() - cached[0] < self.settings.policy_refresh_s:
            return cached[1]
        with self.read() as conn:
            row = conn.execute(
                select(P.c.name, P.c.version, P.c.source).order_by(P.c.version.desc()).limit(1)
            ).first()
        if row is None:
            raise ServerError(503, "no_policy", "no policy is stored; run `bam server init`")
        pv = PolicyVersion(name=row.name, version=row.version, source=row.source)
        if cached is not None and (cached[1].version, cached[1].source) == (pv.version, pv.source):
            pv = cached[1]  # keep the object: its sha256 and input paths are computed once
        with self._policy_lock:
            self._policy = (time.monotonic(), pv)
        return pv

    def policy_rows(self, limit: int = 50) -> list[RowMapping]:
        with self.read() as conn:
            return list(
                conn.execute(select(P).order_by(P.c.version.desc()).limit(limit)).mappings()
            )
