"""The server's operations, independent of HTTP: one :class:`Service` per process.

:class:`Service` wraps the database engine, the server key and the settings; the FastAPI
routes, the CLI and the tests call it. Each module here does one thing and contributes its
methods as a mixin over :class:`~bam.server.service.core.ServiceCore`:

========================  ==========================================================
``core``                  engine, keys, settings, audit rows (the shared plumbing)
``policies``              stored Rego policies and the version in force
``appraisal``             decide (policy + hold) and store a result (compare-and-set)
``enrolment``             enrolment tokens, enrolment, agent request signatures
``evidence``              challenges; verify, appraise and store one evidence token
``evidence_batch``        several tokens of one agent's chain per request
``staleness``             stale marks for silent workloads; purge of spent rows
``workloads``             registration and reference values
``operators``             operator tokens and hold acknowledgements
``actions``               actions fetched and reported by agents
``queries``               read-only views (results, evidence, audit, counts)
``secrets``               the access gate and workload secrets
``intel``                 loaded threat-intelligence indicators and their lookup
========================  ==========================================================
"""

from __future__ import annotations

from sqlalchemy import Engine

from bam.evidence.keys.software import SoftwareSigner
from bam.server.service.actions import ActionsMixin
from bam.server.service.core import AC, AU, OT, A, E, N, P, R, S, ServiceCore, T, W
from bam.server.service.enrolment import EnrolmentMixin
from bam.server.service.evidence import EvidenceOutcome
from bam.server.service.evidence_batch import EvidenceBatchMixin
from bam.server.service.operators import OperatorsMixin
from bam.server.service.secrets import SecretsMixin
from bam.server.service.staleness import StalenessMixin
from bam.server.service.workloads import WorkloadsMixin
from bam.server.settings import ServerSettings

__all__ = [
    "AC",
    "AU",
    "OT",
    "A",
    "E",
    "EvidenceOutcome",
    "N",
    "P",
    "R",
    "S",
    "Service",
    "ServiceCore",
    "T",
    "W",
]


class Service(
    EnrolmentMixin,
    EvidenceBatchMixin,
    StalenessMixin,
    WorkloadsMixin,
    OperatorsMixin,
    ActionsMixin,
    SecretsMixin,
):
    """Everything the server does, over one database."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        engine: Engine | None = None,
        signer: SoftwareSigner | None = None,
        run_migrations: bool = True,
    ) -> None:
        super().__init__(settings, engine=engine, signer=signer, run_migrations=run_migrations)
        self.ensure_default_policy()
