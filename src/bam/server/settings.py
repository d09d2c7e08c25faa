"""Server configuration: ``BAM_*`` environment variables over a TOML file over defaults.

Precedence (highest first): explicit arguments, environment (``BAM_DATABASE_URL``,
``BAM_PORT`` …), the TOML file (``BAM_CONFIG``, else ``<data dir>/server/server.toml``), then
the defaults below. Defaults give a working single-machine server: SQLite in the user's data
directory, loopback only, TLS when ``bam server init`` has made certificates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bam.evidence.keys.software import default_data_dir


def _cores() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _default_server_dir() -> Path:
    return default_data_dir() / "server"


def config_file() -> Path:
    """The TOML file read for settings: ``$BAM_CONFIG`` or ``<data dir>/server/server.toml``."""
    explicit = os.environ.get("BAM_CONFIG")
    return Path(explicit) if explicit else _default_server_dir() / "server.toml"


class ServerSettings(BaseSettings):
    """Everything the server reads from its environment; see ``docs/server.md``."""

    model_config = SettingsConfigDict(env_prefix="BAM_", extra="ignore", frozen=True)

    server_dir: Path = Field(default_factory=_default_server_dir)
    """Where the SQLite database, the server signing key and TLS files live."""
    database_url: str | None = None
    """SQLAlchemy URL; default ``sqlite:///<server_dir>/bam.db``. PostgreSQL:
    ``postgresql+psycopg://user@host/db``."""
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    """WAL + NORMAL survives a crash of the server process (every commit is in the WAL) but can
    lose the last commits on power loss; FULL fsyncs each commit (~3.5 ms here) and survives
    power loss too, at a large cost in throughput."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8443
    workers: Annotated[int, Field(ge=1, le=64)] = Field(default_factory=_cores)
    """uvicorn worker processes; default: the cores this process may run on (at most 8)."""
    tls: bool | None = None
    """``None``: serve TLS when the certificate and key files exist."""
    tls_cert: Path | None = None
    tls_key: Path | None = None

    max_body_bytes: Annotated[int, Field(ge=1024, le=16 << 20)] = 256 * 1024
    nonce_ttl_s: Annotated[float, Field(gt=0, le=60)] = 60.0
    clock_skew_s: Annotated[float, Field(ge=0, le=300)] = 30.0
    request_max_age_s: Annotated[float, Field(gt=0, le=600)] = 120.0
    """Age limit of an agent's signed request (``BAM-Signature`` ts)."""
    default_interval_s: Annotated[float, Field(gt=0)] = 30.0
    stale_factor: Annotated[float, Field(ge=1)] = 3.0
    """A workload is stale when it has not reported for interval × stale_factor."""
    stale_check_s: Annotated[float, Field(gt=0)] = 5.0
    release_max_age_s: Annotated[float, Field(gt=0)] = 300.0
    """Secret release needs an affirming result no older than this (and no older than the
    workload's interval × stale_factor)."""
    enrol_token_ttl_s: Annotated[float, Field(gt=0)] = 24 * 3600.0

    agent_requests_per_minute: Annotated[int, Field(ge=1)] = 1200
    """Per-agent limit, counted in the database so it holds across replicas."""
    operator_requests_per_minute: Annotated[int, Field(ge=1)] = 3000
    """Per-operator-token limit, counted per process (documented: N replicas allow N×)."""
    auth_failures_per_minute: Annotated[int, Field(ge=1)] = 120
    """Failed authentications tolerated per client address per process before 429."""
    policy_refresh_s: Annotated[float, Field(ge=0)] = 2.0
    """How long a replica trusts its cached copy of the active policy."""
    long_poll_max_s: Annotated[float, Field(ge=0, le=120)] = 30.0

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("database_url")
    @classmethod
    def _no_empty_url(cls, v: str | None) -> str | None:
        return v or None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file())
        return (init_settings, env_settings, toml)

    @property
    def url(self) -> str:
        """The database URL in force (explicit, else the embedded SQLite file)."""
        return self.database_url or f"sqlite:///{self.server_dir / 'bam.db'}"

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql`` (what the URL names)."""
        return self.url.split(":", 1)[0].split("+", 1)[0]

    @property
    def key_dir(self) -> Path:
        return self.server_dir / "keys"

    @property
    def tls_dir(self) -> Path:
        return self.server_dir / "tls"

    @property
    def cert_path(self) -> Path:
        return self.tls_cert or self.tls_dir / "server.pem"

    @property
    def key_path(self) -> Path:
        return self.tls_key or self.tls_dir / "server-key.pem"

    @property
    def ca_path(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def use_tls(self) -> bool:
        if self.tls is not None:
            return self.tls
        return self.cert_path.exists() and self.key_path.exists()
