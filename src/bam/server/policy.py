"""Rego appraisal policies, evaluated in-process with ``regopy`` (rego-cpp).

A policy is a Rego module whose ``data.bam.policy.decision`` is an object (see
:class:`Decision` and ``default.rego``). It is compiled into a bundle once per process and
policy version and queried per appraisal.

**One thread.** rego-cpp (through ``regopy``'s ctypes calls, which release the GIL) keeps
thread-local state (trieste's well-formedness and pass contexts) and is not documented as
thread-safe; interpreters used from several threads, or freed by a dying thread while another
evaluates, are what can crash the whole process. So every rego-cpp call — compile, evaluate,
free — runs on one dedicated thread per process (:data:`_REGO`), and the compiled bundles live
and die there. Callers on other threads wait for the answer; with the decision cache below
most appraisals never get that far.

**What the policy sees.** :func:`input_paths` reads the policy source for every
``input.a.b…`` reference and the policy is given only those parts of the input document (a
bare ``input``, a dynamic ``input[x]`` or ``object.get(input, …)`` gives it the whole
document). A policy cannot observe anything it does not reference, so its decision is the
same; the input is smaller to build, and the decision cache key covers exactly what the
decision depends on — for the shipped policy, discrete findings only, not the raw scores.

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
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bam.server import metrics
from bam.server.errors import PolicyError

ENTRYPOINT = "bam/policy/decision"
DEFAULT_NAME = "bam-default"
MAX_POLICY_BYTES = 256 * 1024
_T = TypeVar("_T")

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
    """An interpreter holding one compiled bundle (only ever touched on the rego thread)."""

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

    def close(self) -> None:
        """Free the bundle, then the interpreter it was built by (in that order)."""
        del self.bundle
        del self.interp

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

    def free(self) -> None:
        if hasattr(self, "_impl"):
            self._rs.rego_free_input(self._impl)
            del self._impl

    def __del__(self) -> None:
        self.free()


def _set_input(interp: Any, document: dict[str, Any]) -> None:
    from regopy.rego_shared import rego_set_input

    value = _Input(document)
    try:
        rego_set_input(interp._impl, value._impl)  # the interpreter keeps its own reference
    finally:
        value.free()  # freed here, on this thread, not whenever the collector runs


# ---- the rego thread -----------------------------------------------------------------------

_REGO = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bam-rego")
_COMPILED: dict[str, _Compiled] = {}  # by policy sha256; read and written on the rego thread only


def _on_rego_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` on the rego thread (inline if already there) and return its result."""
    if threading.current_thread().name.startswith("bam-rego"):
        return fn(*args)
    return _REGO.submit(fn, *args).result()


def _evaluate_here(policy: PolicyVersion, document: dict[str, Any]) -> Decision:
    hit = _COMPILED.get(policy.sha256)
    if hit is None:
        while len(_COMPILED) >= 4:  # a few versions in flight at most; free the oldest
            _COMPILED.pop(next(iter(_COMPILED))).close()
        hit = _COMPILED[policy.sha256] = _Compiled(policy.source, f"{policy.name}.rego")
    return hit.evaluate(document, policy.source)


def _validate_here(source: str, name: str) -> list[Decision]:
    compiled = _Compiled(source, f"{name}.rego")
    try:
        return [compiled.evaluate(doc, source) for doc in sample_inputs()]
    finally:
        compiled.close()


# ---- what the policy reads ------------------------------------------------------------------

_INPUT_REF = re.compile(r"\binput\b")
_LEXEME = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`]*`|#[^\n]*')
_FIELD = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*\"([^\"\\]*)\"\s*\]")
Path = tuple[str, ...]


@functools.lru_cache(maxsize=16)
def input_paths(source: str) -> frozenset[Path] | None:
    """The input paths ``source`` references (``None``: it may read the whole input).

    Every occurrence of the word ``input`` outside comments counts — in rules, imports and
    strings alike (reading too much is harmless; too little is not) — with the static path
    that follows it (``.name`` or ``["name"]`` steps). Anything else after a step (an index,
    a variable, a call) ends the path there, so the policy gets that whole subtree.
    """
    paths: set[Path] = set()
    code = _without_comments(source)
    for m in _INPUT_REF.finditer(code):
        pos, path = m.end(), []
        while step := _FIELD.match(code, pos):
            path.append(step.group(1) or step.group(2))
            pos = step.end()
        if not path:
            return None
        paths.add(tuple(path))
    # A path below another one adds nothing: keep the shortest prefixes.
    return frozenset(p for p in paths if not any(p[: len(q)] == q for q in paths if q != p))


def _without_comments(source: str) -> str:
    """``source`` with its ``#`` comments blanked (a ``#`` inside a string is not one).

    A policy with template strings (``$"…{expr}…"``, whose expressions may hold quotes) is
    left as it is: its comments then count too, which can only widen what it is given.
    """
    if '$"' in source:
        return source
    return _LEXEME.sub(lambda m: m.group(0) if m.group(0)[0] in '"`' else "", source)


def project(document: dict[str, Any], paths: frozenset[Path] | None) -> dict[str, Any]:
    """The parts of ``document`` a policy reading ``paths`` can observe (see module doc)."""
    if paths is None:
        return document
    out: dict[str, Any] = {}
    for path in paths:
        src: Any = document
        dst = out
        for i, key in enumerate(path):
            if key not in src:
                break
            value = src[key]
            if i == len(path) - 1 or type(value) is not dict:
                dst[key] = value  # the leaf, or a non-object the path cannot go through
                break
            dst = dst.setdefault(key, {})
            src = value
    return out


# ---- evaluation and its cache ---------------------------------------------------------------

# Decisions are a pure function of (policy, input) unless the policy calls a builtin whose
# answer changes between calls; such policies are never cached.
_IMPURE = re.compile(r"\b(time\.now_ns|http\.send|rand\.|uuid\.|opa\.runtime|crypto\.x509|net\.)")


class DecisionCache:
    """A bounded LRU of decisions keyed by (policy sha256, sha256 of the canonical input)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, Decision] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(policy: PolicyVersion, document: dict[str, Any]) -> str:
        # Not sorted: equal text still means an equal document, so a hit is always right;
        # the same document with its members in another order is only a miss. The server
        # builds inputs in one order, so sorting bought nothing. orjson: ~10x json's speed,
        # and this runs for every evidence.
        text = orjson.dumps(document)
        return hashlib.sha256(policy.sha256.encode() + b"\n" + text).hexdigest()

    def get(self, key: str) -> Decision | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            return hit

    def put(self, key: str, decision: Decision) -> None:
        with self._lock:
            self._entries[key] = decision
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


DECISIONS = DecisionCache(4096)


@functools.lru_cache(maxsize=16)
def _cacheable(source: str) -> bool:
    return _IMPURE.search(source) is None


def evaluate(policy: PolicyVersion, document: dict[str, Any]) -> Decision:
    """Evaluate ``policy`` on the input ``document``; :class:`PolicyError` if it fails.

    The policy gets the parts of ``document`` it references (:func:`project`). Decisions of
    pure policies are cached on exactly that projection (a repeated finding — the steady state
    of a quiet workload — skips the interpreter). Failures are not cached.
    """
    seen = project(document, input_paths(policy.source))
    if not _cacheable(policy.source):
        return _on_rego_thread(_evaluate_here, policy, seen)
    key = DECISIONS.key(policy, seen)
    hit = DECISIONS.get(key)
    if hit is not None:
        metrics.POLICY_CACHE.labels("hit").inc()
        return hit
    metrics.POLICY_CACHE.labels("miss").inc()
    decision = _on_rego_thread(_evaluate_here, policy, seen)
    DECISIONS.put(key, decision)
    return decision


def sample_inputs() -> list[dict[str, Any]]:
    """Inputs a policy must decide at upload: healthy, attacked, gap, reset, mismatched, a file
    known to threat intelligence, stale."""
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
        "intel": {"matches": []},
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
    base["evidence"]["chain_reset"] = False
    attacked = _merge(base, {"behavior": {"severity": "critical", "label": "exploit"}})
    gap = _merge(base, {"evidence": {"chain_gap": True, "chain_missing": 2}})
    reset = _merge(base, {"evidence": {"seq": 40, "chain_reset": True}})
    mismatch = _merge(
        base,
        {
            "measurements": {
                "reference": True,
                "mismatches": [{"path": "/usr/bin/x", "role": "exe"}],
            }
        },
    )
    bad_file = {"path": "/usr/bin/x", "role": "exe", "indicator": "indicator--0", "name": "sample"}
    known_bad = {**base, "intel": {"matches": [bad_file]}}
    stale = _merge(base, {"trigger": "stale", "workload": {"stale": True}})
    stale["behavior"] = None
    return [base, attacked, gap, reset, mismatch, known_bad, stale]


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
    return _on_rego_thread(_validate_here, source, name)
