"""Rego appraisal policies, evaluated in-process with ``regopy`` (rego-cpp).

A policy is a Rego module whose ``data.bam.policy.decision`` is an object (see
:class:`Decision` and ``default.rego``). It is compiled into a bundle once per thread and
policy version (rego-cpp interpreters are not thread-safe) and queried per appraisal.

Validation (:func:`validate`) compiles the module *and* evaluates it on sample inputs: rego-cpp
reports some errors (recursion, conflicting values) only at evaluation, and a policy that
compiles but cannot produce a decision must be refused at upload, not discovered at the first
evidence.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bam.server.errors import PolicyError

ENTRYPOINT = "bam/policy/decision"
DEFAULT_NAME = "bam-default"
MAX_POLICY_BYTES = 256 * 1024

Status = Literal["affirming", "warning", "contraindicated", "none"]
ActionName = Literal["allow", "monitor", "investigate", "isolate", "terminate"]

STATUS_RANK: dict[str, int] = {"none": 0, "affirming": 1, "warning": 2, "contraindicated": 3}
ACTION_RANK: dict[str, int] = {
    "allow": 0,
    "monitor": 1,
    "investigate": 2,
    "isolate": 3,
    "terminate": 4,
}
TRUST_CLAIMS = (
    "instance-identity",
    "configuration",
    "executables",
    "file-system",
    "hardware",
    "runtime-opaque",
    "storage-opaque",
    "sourced-data",
)


class Decision(BaseModel):
    """What a policy must return."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Status
    action: ActionName
    reasons: list[str] = Field(default_factory=list, max_length=64)
    trust_vector: dict[str, int] = Field(default_factory=dict)
    clear_hold: bool = False


def default_source() -> str:
    """The policy that ships with BAM (``bam/server/default.rego``)."""
    return resources.files("bam.server").joinpath("default.rego").read_text("utf-8")


def _rego() -> Any:
    import regopy

    return regopy


_ERRMSG = re.compile(r"\(errormsg (\d+):")
_ERRLOC = re.compile(r"\(error (\d+):")


def _sexpr_string(text: str, start: int) -> tuple[str, int]:
    """Read a ``LEN:content`` atom of rego-cpp's error s-expression at ``start``."""
    colon = text.index(":", start)
    n = int(text[start:colon])
    return text[colon + 1 : colon + 1 + n], colon + 1 + n


def _location(raw: str, before: int, source: str) -> str:
    """``file:line:col`` of the ``(error NAME|offset|len`` that precedes ``before``."""
    locs = list(_ERRLOC.finditer(raw, 0, before))
    if not locs:
        return ""
    try:
        name, pos = _sexpr_string(raw, locs[-1].start(1))
        offset = int(raw[pos:].split(None, 1)[0].split("|")[1])
    except (ValueError, IndexError):
        return ""
    line = source.count("\n", 0, offset) + 1
    col = offset - (source.rfind("\n", 0, offset) + 1) + 1
    return f"{name}:{line}:{col}: "


def format_rego_error(raw: str, source: str) -> str:
    """Turn rego-cpp's error s-expression into ``file:line:col: message`` lines."""
    lines: list[str] = []
    for m in _ERRMSG.finditer(raw):
        try:
            message, _ = _sexpr_string(raw, m.start(1))
        except (ValueError, IndexError):
            continue
        lines.append(_location(raw, m.start(), source) + message)
    if lines:
        return "; ".join(lines)[:2000]
    first = raw.strip().splitlines()[0] if raw.strip() else ""
    if first in ("", "<error>"):
        # rego-cpp reports some run-time errors (a complete rule with two values) with no text.
        return "evaluation failed (rego-cpp gave no detail: e.g. a rule with conflicting values)"
    return first[:500]


@dataclass(frozen=True)
class PolicyVersion:
    """One stored policy version."""

    name: str
    version: int
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    @property
    def policy_id(self) -> str:
        """The id results record: ``name@vVERSION``."""
        return f"{self.name}@v{self.version}"


class _Compiled:
    """An interpreter holding one compiled bundle (used by one thread only)."""

    def __init__(self, source: str, filename: str) -> None:
        regopy = _rego()
        self.interp = regopy.Interpreter()
        # rego-cpp prints errors to stdout unless told not to; we report them as text instead.
        # (Per interpreter: its process-wide default may be set only once, a second call aborts.)
        self.interp.log_level = regopy.LogLevel.NONE
        try:
            self.interp.add_module(filename, source)
            self.bundle = self.interp.build(None, [ENTRYPOINT])
        except regopy.RegoError as e:
            raise PolicyError("policy_invalid", format_rego_error(str(e), source)) from None

    def evaluate(self, document: dict[str, Any], source: str) -> Decision:
        regopy = _rego()
        from regopy.rego_shared import (
            rego_bundle_query_entrypoint,
            rego_free_output,
            rego_output_ok,
            rego_output_string,
        )

        try:
            self.interp.set_input(document)
            # The low-level call: regopy's Output parses the text as JSON and fails with a
            # JSONDecodeError when rego-cpp returns an error document (e.g. recursion).
            impl = rego_bundle_query_entrypoint(self.interp._impl, self.bundle._impl, ENTRYPOINT)
        except regopy.RegoError as e:
            raise PolicyError("policy_error", format_rego_error(str(e), source)) from None
        try:
            ok, text = rego_output_ok(impl), rego_output_string(impl)
        finally:
            rego_free_output(impl)
        if not ok or text.lstrip().startswith("("):
            raise PolicyError("policy_error", format_rego_error(text, source))
        if text.strip() == "undefined":
            raise PolicyError("policy_output_invalid", "data.bam.policy.decision is undefined")
        try:
            parsed = json.loads(text)
            value = parsed["expressions"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise PolicyError(
                "policy_output_invalid", "data.bam.policy.decision is undefined"
            ) from None
        try:
            return Decision.model_validate(value)
        except ValidationError as e:
            first = e.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "decision"
            raise PolicyError(
                "policy_output_invalid", f"data.bam.policy.decision: {where}: {first['msg']}"
            ) from None


_local = threading.local()


def _compiled(policy: PolicyVersion) -> _Compiled:
    cache: dict[str, _Compiled] | None = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    hit = cache.get(policy.sha256)
    if hit is None:
        if len(cache) >= 4:
            cache.clear()
        hit = cache[policy.sha256] = _Compiled(policy.source, f"{policy.name}.rego")
    return hit


def evaluate(policy: PolicyVersion, document: dict[str, Any]) -> Decision:
    """Evaluate ``policy`` on the input ``document``; :class:`PolicyError` if it fails."""
    return _compiled(policy).evaluate(document, policy.source)


def sample_inputs() -> list[dict[str, Any]]:
    """Inputs a policy must decide at upload: healthy, attacked, gap, stale, mismatched."""
    base: dict[str, Any] = {
        "trigger": "evidence",
        "agent": {"id": "agt_sample", "name": "sample", "tpm": False},
        "workload": {
            "name": "sample",
            "kind": "process",
            "stale": False,
            "hold": False,
            "previous_status": "affirming",
        },
        "evidence": {"seq": 2, "iat": 1_700_000_000, "tpm": False, "chain_gap": False},
        "measurements": {
            "reference": False,
            "mismatches": [],
            "unknown": 0,
            "deleted": [],
            "anon_exec_mappings": 0,
        },
        "behavior": {
            "severity": "none",
            "label": "normal",
            "probability": 0.9,
            "baseline_id": "0" * 64,
            "scores": {"ngram": 0.1},
            "thresholds": {"ngram": 1.0},
            "top_features": [],
            "counts": {"new_processes": 0, "new_listening_ports": 0, "exec_mappings": 0},
        },
    }
    base["evidence"]["chain_missing"] = 0
    attacked = _merge(base, {"behavior": {"severity": "critical", "label": "exploit"}})
    gap = _merge(base, {"evidence": {"chain_gap": True, "chain_missing": 2}})
    mismatch = _merge(
        base,
        {
            "measurements": {
                "reference": True,
                "mismatches": [{"path": "/usr/bin/x", "role": "exe"}],
            }
        },
    )
    stale = _merge(base, {"trigger": "stale", "workload": {"stale": True}})
    stale["behavior"] = None
    return [base, attacked, gap, mismatch, stale]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def validate(source: str, name: str = "policy") -> list[Decision]:
    """Compile ``source`` and evaluate it on :func:`sample_inputs`; the decisions, or raise."""
    if len(source.encode("utf-8")) > MAX_POLICY_BYTES:
        raise PolicyError("policy_invalid", f"policy larger than {MAX_POLICY_BYTES} bytes")
    if not source.strip():
        raise PolicyError("policy_invalid", "policy is empty")
    compiled = _Compiled(source, f"{name}.rego")
    return [compiled.evaluate(doc, source) for doc in sample_inputs()]
