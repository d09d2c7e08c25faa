"""Measured file lists kept by digest, so that a token may give its files by reference.

A workload's executable and libraries rarely change between windows, yet every token used to
carry all of them (~24 hashes, most of a token's size and of its verification cost). A token
now always states ``files_sha256`` and, once the server holds that list, may leave the list
out (:class:`bam.evidence.claims.Measurements`). This module resolves such a digest to the
list for appraisal, and says which lists given in full still need storing.

* **Content-addressed.** A list is stored under the sha256 of its canonical JSON, once, never
  changed or tied to an agent: the token's signature covers the digest and the digest commits
  to the list, so resolving it yields exactly what the agent signed for.
* **Verified before stored.** A list is inserted only in the write transaction of a token that
  verified completely (with the same compare-and-set rules as the rest of it).
* **Per-process cache, always correct.** Rows never change, so a cached list is the stored
  one; the cache only saves the read. Several replicas need nothing shared.
* **Unknown digest: 409 ``measurements_unknown``.** Nothing is stored; the agent signs the
  token again with the list in full (a restored database, a new replica's first read).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from bam.evidence.claims import FileMeasurement, Measurements
from bam.server.db import hot
from bam.server.errors import ServerError
from bam.server.service.core import ServiceCore, dumps

Files = tuple[FileMeasurement, ...]

CACHED_SETS = 1024
"""File lists kept parsed per process (an agent's workloads usually share a few)."""


class FileSetsMixin(ServiceCore):
    """Resolve ``files_sha256`` to measured files; remember lists known to be stored."""

    def _known_files(self, digest: str) -> Files | None:
        hit = self._file_sets.get(digest)
        if hit is not None:
            self._file_sets.move_to_end(digest)
        return hit

    def _remember_files(self, digest: str, files: Files) -> None:
        """``files`` is stored under ``digest`` (read back, or committed by this process)."""
        cache = self._file_sets
        cache[digest] = files
        cache.move_to_end(digest)
        while len(cache) > CACHED_SETS:
            cache.popitem(last=False)

    def _resolve_files(
        self, cur: Any, ms: Measurements, pending: Mapping[str, Files]
    ) -> tuple[Files, str | None]:
        """The files of ``ms`` and, for a list given in full and not known to be stored, its
        JSON to store with the token. ``pending``: lists that earlier, not yet written tokens
        of the same batch store."""
        digest = ms.files_sha256
        if not ms.by_reference:
            files = tuple(ms.files)
            if digest is None or digest in pending or self._known_files(digest) is not None:
                return files, None
            return files, _files_json(files)
        assert digest is not None  # by_reference
        known = pending.get(digest) or self._known_files(digest)
        if known is not None:
            return known, None
        row = hot.one(cur, self._hot.files, {"files_sha256": digest})
        if row is None:
            raise ServerError(
                409,
                "measurements_unknown",
                f"no measured file list with sha256 {digest} is stored here: "
                "send the files in full",
            )
        files = tuple(FileMeasurement.model_validate(f) for f in json.loads(row[0]))
        self._remember_files(digest, files)
        return files, None


def _files_json(files: Sequence[FileMeasurement]) -> str:
    return dumps([f.model_dump(mode="json", exclude_none=True) for f in files])
