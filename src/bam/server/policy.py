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

import functools
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

    @functools.cached_property
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
            _set_input(self.interp, document)
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


class _Input:
    """A rego-cpp input document built with direct C calls (owned; freed with the object).

    The same encoding as ``regopy.Input`` (objects, arrays, strings, numbers, booleans, null),
    with exact type dispatch and no intermediate buffers: about twice as fast, and the policy
    input is built once per appraisal.
    """

    def __init__(self, value: Any) -> None:
        from regopy import rego_shared as rs

        self._rs = rs
        self._impl = rs.rego_new_input()
        try:
            self._add(value)
        except Exception:
            rs.rego_free_input(self._impl)
            del self._impl
            raise

    def _add(self, val: Any) -> None:
        lib, p = self._rs.rego, self._impl
        t = type(val)
        if t is str:
            res = lib.regoInputString(p, val.encode("utf-8"))
        elif t is dict:
            for k, v in val.items():
                if type(k) is not str:
                    raise ValueError("policy input keys must be strings")
                self._check(lib.regoInputString(p, k.encode("utf-8")))
                self._add(v)
                self._check(lib.regoInputObjectItem(p))
            res = lib.regoInputObject(p, len(val))
        elif t is bool:
            res = lib.regoInputBoolean(p, val)
        elif t is int:
            res = lib.regoInputInt(p, val)
        elif t is float:
            res = lib.regoInputFloat(p, val)
        elif val is None:
            res = lib.regoInputNull(p)
        elif t is list or t is tuple:
            for x in val:
                self._add(x)
            res = lib.regoInputArray(p, len(val))
        else:
            raise ValueError(f"cannot convert {t.__name__} to a policy input")
        self._check(res)

    def _check(self, res: int) -> None:
        if res != self._rs.Code.OK:
            raise self._rs.RegoError("Unable to create input", res)

    def __del__(self) -> None:
        if hasattr(self, "_impl"):
            self._rs.rego_free_input(self._impl)


def _set_input(interp: Any, document: dict[str, Any]) -> None:
    from regopy.rego_shared import rego_set_input

    value = _Input(document)  # a name keeps it alive (freed on collection) during the call
    rego_set_input(interp._impl, value._impl)


_local = threading.local()

# Decisions are a pure function of (policy, input) unless the policy calls a builtin whose
# answer changes between calls; such policies are never cached.
_IMPURE = re.compile(r"\b(time\.now_ns|http\.send|rand\.|uuid\.|opa\.runtime|crypto\.x509|net\.)")
_DECISIONS: dict[str, Decision] = {}
_DECISIONS_MAX = 4096


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


@functools.lru_cache(maxsize=16)
def _cacheable(source: str) -> bool:
    return _IMPURE.search(source) is None


def evaluate(policy: PolicyVersion, document: dict[str, Any]) -> Decision:
    """Evaluate ``policy`` on the input ``document``; :class:`PolicyError` if it fails.

    Decisions of pure policies are cached, keyed by the policy's sha256 and a digest of the
    canonical input document (a repeated input — the steady state of a quiet workload — skips
    the interpreter). Failures are not cached.
    """
    if not _cacheable(policy.source):
        return _compiled(policy).evaluate(document, policy.source)
    key = hashlib.sha256(
        policy.sha256.encode()
        + json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    hit = _DECISIONS.get(key)
    if hit is not None:
        return hit
    decision = _compiled(policy).evaluate(document, policy.source)
    if len(_DECISIONS) >= _DECISIONS_MAX:
        _DECISIONS.clear()
    _DECISIONS[key] = decision
    return decision


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
