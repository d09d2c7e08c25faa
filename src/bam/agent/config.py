"""Agent settings: arguments > ``BAM_AGENT_*`` environment > TOML file > defaults.

The TOML file is ``$BAM_AGENT_CONFIG`` (or ``--config``), top-level keys plus one
``[[targets]]`` table per workload::

    server_url = "https://bam.example:8443"
    enrol_token = "bamenr_..."          # used once; the agent's key is pinned afterwards
    name = "host-a"
    interval_s = 30

    [[targets]]
    name = "web"
    command = ["python3", "-m", "http.server", "8000"]
    profile_s = 120

A target is exactly one of ``command`` (the agent starts it, in its own cgroup), ``pid`` (a
running process tree) or ``cgroup`` (a v2 or v1 group).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bam.evidence.keys.software import default_data_dir


class TargetSpec(BaseModel):
    """One workload the agent watches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")]
    command: list[str] | None = None
    pid: Annotated[int, Field(gt=0)] | None = None
    cgroup: str | None = None
    profile_s: Annotated[float, Field(gt=0)] = 60.0
    profile_slices: Annotated[int, Field(ge=4, le=64)] = 16
    """The profile is cut into this many time slices: the baseline's traces."""
    holdout: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """Share of the slices held out to calibrate thresholds. Half, not the library's quarter:
    on a short live profile a quarter left rare-but-normal request mixes out of the
    calibration and the demo service raised false alarms (measured: 22 alert ticks in 40 s
    with 8 slices / 0.25, none with 16 / 0.5; the attack still scores ~8x threshold)."""
    baseline: Path | None = None
    reprofile: bool = False
    model: str = "lm"
    window: Annotated[int, Field(ge=4, le=10_000)] = 30
    target_far: Annotated[float, Field(gt=0, lt=0.5)] = 0.001
    decay: Annotated[float, Field(gt=0, lt=1)] = 0.8
    horizon_s: Annotated[float, Field(gt=0)] = 2.0
    """Time constant of the workload-wide frequency of anomalous windows (all threads)."""
    interval_s: Annotated[float, Field(gt=0)] | None = None
    keep_raw_logs: Annotated[int, Field(ge=1)] = 100

    @model_validator(mode="after")
    def _one_kind(self) -> TargetSpec:
        given = [k for k in ("command", "pid", "cgroup") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"target {self.name!r}: give exactly one of command, pid, cgroup (got "
                f"{', '.join(given) or 'none'})"
            )
        return self


def config_file() -> Path | None:
    explicit = os.environ.get("BAM_AGENT_CONFIG")
    return Path(explicit) if explicit else None


class AgentSettings(BaseSettings):
    """Everything the agent daemon needs (see the module docstring for precedence)."""

    model_config = SettingsConfigDict(env_prefix="BAM_AGENT_", extra="forbid", frozen=True)

    server_url: str = "https://127.0.0.1:8443"
    enrol_token: str | None = None
    name: str = Field(default_factory=lambda: os.uname().nodename)
    data_dir: Path = Field(default_factory=lambda: default_data_dir() / "agent")
    tls_verify: bool | str = True
    interval_s: Annotated[float, Field(gt=0)] = 30.0
    tick_s: Annotated[float, Field(gt=0, le=5)] = 0.2
    urgent_min_gap_s: Annotated[float, Field(ge=0)] = 0.5
    backend: str = "auto"
    spool_max: Annotated[int, Field(ge=1)] = 10_000
    request_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    apply_actions: bool = True
    targets: list[TargetSpec] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_settings(config: Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from ``config`` (TOML) or ``$BAM_AGENT_CONFIG``, env and ``overrides``."""
    if config is not None:
        if not config.is_file():
            raise FileNotFoundError(f"agent config {config} does not exist")
        old = os.environ.get("BAM_AGENT_CONFIG")
        os.environ["BAM_AGENT_CONFIG"] = str(config)
        try:
            return AgentSettings(**overrides)
        finally:
            if old is None:
                os.environ.pop("BAM_AGENT_CONFIG", None)
            else:
                os.environ["BAM_AGENT_CONFIG"] = old
    return AgentSettings(**overrides)
