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
running process tree), ``cgroup`` (a v2 or v1 group) or ``qmp`` (a QEMU VM by its QMP socket;
its in-guest syscall stream is the file named by ``vm_trace``, by default the ``trace`` of the
``vm.json`` that ``bam vm start`` writes beside the socket)::

    [[targets]]
    name = "web-vm"
    qmp = "/run/bam/vm/web/qmp.sock"
    # vm_trace = "/run/bam/vm/web/trace.bin"
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

KINDS = ("command", "pid", "cgroup", "qmp")


class TargetSpec(BaseModel):
    """One workload the agent watches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")]
    command: list[str] | None = None
    pid: Annotated[int, Field(gt=0)] | None = None
    cgroup: str | None = None
    qmp: Path | None = None
    """A QEMU VM's QMP socket (``-qmp unix:PATH,server=on,wait=off``)."""
    vm_trace: Path | None = None
    """The guest's syscall stream (the file QEMU writes the guest's trace port to); default:
    ``trace`` in the ``vm.json`` beside the QMP socket."""
    vm_resource_hz: Annotated[float, Field(gt=0, le=20)] = 1.0
    """How often a VM's host-side resources (QEMU CPU, vCPU threads, RSS, block I/O) are
    sampled."""
    resource_hz: Annotated[float, Field(gt=0, le=20)] = 1.0
    """How often a process target's resources (CPU, RSS, disk and network bytes, threads, fds)
    are sampled."""
    profile_s: Annotated[float, Field(gt=0)] = 60.0
    profile_slices: Annotated[int, Field(ge=4, le=64)] = 16
    """The profile is cut into this many time slices: the baseline's traces."""
    holdout: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """Share of the slices held out to calibrate thresholds. Half, not the library's quarter:
    on a short live profile a quarter left rare-but-normal request mixes out of the
    calibration and the demo service raised false alarms (measured: 22 alert ticks in 40 s
    with 8 slices / 0.25, none with 16 / 0.5; the attack still scores ~8x threshold)."""
    baseline: Path | None = None
    classifier: Path | None = None
    """An attack classifier (``bam classifier train``): names what an anomaly looks like;
    its label and probability go into the evidence, its ``model_id`` into the measurements."""
    classifier_id: str | None = None
    """Pin the classifier file to this ``model_id`` (refused otherwise)."""
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
        given = [k for k in KINDS if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"target {self.name!r}: give exactly one of command, pid, cgroup, qmp (got "
                f"{', '.join(given) or 'none'})"
            )
        if self.qmp is None and self.vm_trace is not None:
            raise ValueError(
                f"target {self.name!r}: vm_trace is the guest stream of a VM target; "
                "give qmp (the VM's QMP socket) too"
            )
        if self.qmp is not None and str(self.qmp).strip() in ("", "."):
            raise ValueError(f"target {self.name!r}: qmp must name the VM's QMP socket")
        if self.qmp is not None and self.qmp.exists() and not self.qmp.is_socket():
            raise ValueError(
                f"target {self.name!r}: qmp {self.qmp} is not a socket (give the path of "
                "QEMU's -qmp unix:PATH,server=on,wait=off)"
            )
        if self.vm_trace is not None and self.vm_trace.is_dir():
            raise ValueError(
                f"target {self.name!r}: vm_trace {self.vm_trace} is a directory, not the "
                "guest's trace stream file"
            )
        return self

    @property
    def kind(self) -> str:
        """``vm`` for a QMP target, else ``process`` (how the server registers it)."""
        return "vm" if self.qmp is not None else "process"


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
    batch_max: Annotated[int, Field(ge=1, le=64)] = 16
    """Tokens per evidence request when several observations wait (one per target per
    interval, more after an outage); 1 sends every token alone."""
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
