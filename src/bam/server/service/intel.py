"""Loaded threat intelligence: store a feed's indicators, look measured files up in them.

A bundle is loaded under a *source* name (the feed); loading again replaces that source's
indicators in one transaction, so a feed refresh never leaves a half-old, half-new list. The
lookup table is kept per process and checked every ``policy_refresh_s``, like the policy in
force, so a replica notices another replica's load within that time; the check reads one
row (the table's count and newest id) and the table itself only when that changed, and the
evidence path pays one dict lookup per measured file.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, func, insert, select

from bam.server.errors import ServerError
from bam.server.intel import IntelError, parse_bundle
from bam.server.service.core import TI, ServiceCore

SOURCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A source (feed) name; the API's path parameter is checked against the same pattern."""
_SOURCE = re.compile(SOURCE_PATTERN)

IntelIndex = dict[str, list[tuple[str, str, float | None]]]
"""sha256 -> [(indicator id, name, valid until)]."""


class IntelMixin(ServiceCore):
    """Threat-intelligence indicators (STIX 2.1 file hashes)."""

    def load_intel(self, data: bytes | str, source: str, actor: str) -> dict[str, Any]:
        """Replace ``source``'s indicators with the usable ones of a STIX 2.1 bundle."""
        if not _SOURCE.fullmatch(source):
            raise ServerError(
                422, "intel_source_invalid", "a source is 1-128 letters, digits, '.', '_', '-'"
            )
        now = time.time()
        try:
            bundle = parse_bundle(data, now)
        except IntelError as e:
            raise ServerError(422, "intel_invalid", str(e)) from None
        rows = [
            {
                "source": source,
                "stix_id": i.stix_id,
                "sha256": i.sha256,
                "name": i.name,
                "valid_until": i.valid_until,
                "loaded_at": now,
                "loaded_by": actor,
            }
            for i in {(i.stix_id, i.sha256): i for i in bundle.indicators}.values()
        ]
        with self.write() as conn:
            replaced = conn.execute(delete(TI).where(TI.c.source == source)).rowcount
            if rows:
                conn.execute(insert(TI), rows)
            detail = {
                "source": source,
                "hashes": len(rows),
                "replaced": replaced,
                "skipped": bundle.skipped,
            }
            self.audit(conn, actor, "intel_loaded", None, detail, now)
        self._intel = None  # this process sees it at once; other replicas on refresh
        return detail

    def remove_intel(self, source: str, actor: str) -> int:
        """Forget a source's indicators; how many hashes were removed."""
        now = time.time()
        with self.write() as conn:
            n = conn.execute(delete(TI).where(TI.c.source == source)).rowcount
            if n == 0:
                raise ServerError(404, "intel_source_unknown", f"no indicators from {source!r}")
            self.audit(conn, actor, "intel_removed", None, {"source": source, "hashes": n}, now)
        self._intel = None
        return int(n)

    def intel_sources(self) -> list[dict[str, Any]]:
        with self.read() as conn:
            rows = conn.execute(
                select(
                    TI.c.source,
                    func.count().label("hashes"),
                    func.max(TI.c.loaded_at).label("loaded_at"),
                    func.max(TI.c.loaded_by).label("loaded_by"),
                )
                .group_by(TI.c.source)
                .order_by(TI.c.source)
            ).mappings()
            return [dict(r) for r in rows]

    def intel_index(self) -> IntelIndex:
        """The loaded hashes, re-checked every ``policy_refresh_s`` (see the module doc)."""
        cached = self._intel
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.settings.policy_refresh_s:
            return cached[2]
        with self.read() as conn:
            # every load inserts new ids and every removal lowers the count
            version = tuple(conn.execute(select(func.count(), func.max(TI.c.id))).one())
            if cached is not None and cached[1] == version:
                index = cached[2]
            else:
                index = {}
                rows = conn.execute(select(TI.c.sha256, TI.c.stix_id, TI.c.name, TI.c.valid_until))
                for r in rows:
                    index.setdefault(r.sha256, []).append((r.stix_id, r.name, r.valid_until))
        self._intel = (now, version, index)
        return index

    def intel_matches(
        self, files: Iterable[tuple[str, str, str]], now: float
    ) -> list[dict[str, str]]:
        """``(path, role, sha256)`` of measured files -> the ones a valid indicator names."""
        index = self.intel_index()
        if not index:
            return []
        out = []
        for path, role, digest in files:
            for stix_id, name, until in index.get(digest, ()):
                if until is None or until > now:
                    out.append({"path": path, "role": role, "indicator": stix_id, "name": name})
                    break
        return out
