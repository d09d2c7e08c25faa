"""Evidence that fails to arrive: stale marks, and the purge of spent nonces and counters.

Every replica runs :meth:`StalenessMixin.sweep`; the workload's version compare-and-set lets
exactly one of them record each stale result.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import delete, func, select

from bam.server import ratelimit
from bam.server.db import models as m
from bam.server.ear import sign_ear
from bam.server.service.appraisal import AppraisalMixin, RetryError, workload_input
from bam.server.service.core import N, W

_RC = m.table(m.RateCounter)


class StalenessMixin(AppraisalMixin):
    """The periodic sweep."""

    def sweep(self, now: float | None = None) -> list[str]:
        """Mark workloads stale that missed interval × stale_factor; purge old nonces/counters."""
        now = now or time.time()
        factor = self.settings.stale_factor
        seen = func.coalesce(W.c.last_evidence_at, W.c.created_at)
        with self.read() as conn:
            rows = list(
                conn.execute(
                    select(W).where(W.c.stale.is_(False), seen + W.c.interval_s * factor < now)
                ).mappings()
            )
        marked: list[str] = []
        for wl in rows:
            document: dict[str, Any] = {
                "trigger": "stale",
                "agent": {"id": wl["agent_id"], "name": "", "tpm": False},
                "workload": workload_input(wl, stale=True),
                "evidence": {
                    "seq": 0,
                    "iat": 0,
                    "tpm": False,
                    "chain_gap": False,
                    "chain_missing": 0,
                    "chain_reset": False,
                },
                "measurements": {
                    "reference": bool(wl["reference"]),
                    "mismatches": [],
                    "unknown": 0,
                    "deleted": [],
                    "anon_exec_mappings": 0,
                },
                "intel": {"matches": []},
                "behavior": None,
            }
            appraisal, decision = self._decide(wl, document, now)
            ear = sign_ear(appraisal, self.signer, now)
            try:
                with self.write() as conn:
                    self._store_appraisal(
                        conn,
                        wl,
                        appraisal,
                        decision,
                        ear,
                        now,
                        evidence_id=None,
                        severity=wl["severity"],
                        actor="system:stale",
                        stale=True,
                    )
                    self.audit(
                        conn,
                        "system:stale",
                        "stale",
                        wl["name"],
                        {
                            "last_evidence_at": wl["last_evidence_at"],
                            "interval_s": wl["interval_s"],
                        },
                        now,
                    )
                marked.append(wl["name"])
            except RetryError:
                continue  # evidence arrived, or another replica marked it
        with self.write() as conn:
            conn.execute(delete(N).where(N.c.expires_at < now - 3600))
            conn.execute(delete(_RC).where(_RC.c.window < ratelimit.purge_before(now)))
        return marked
