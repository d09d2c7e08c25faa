"""Threat intelligence: the SHA-256 file hashes that STIX 2.1 indicators name as malicious.

An operator loads a STIX 2.1 bundle (a feed's export, a CTI team's list); every evidence's
measured files are then looked up in it, so a workload running a binary or library that a
feed knows as malicious is reported to policy (``intel.matches``) however normal it behaves.

Only what BAM can observe is kept: an indicator counts when its pattern (``pattern_type``
``stix``, validated by the ``stix2`` library) is a disjunction whose alternatives include
``file:hashes.'SHA-256' = '…'`` comparisons — any one satisfied alternative satisfies the
pattern, so matching those alone is sound. A pattern that needs more (``AND``, ``FOLLOWEDBY``,
negation, qualifiers such as ``WITHIN``) cannot be decided from file hashes and is skipped and
counted, never approximated. Revoked and expired indicators are skipped too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import stix2
import stix2.exceptions
from stix2.pattern_visitor import create_pattern_object
from stix2.patterns import (
    EqualityComparisonExpression,
    ObservationExpression,
    OrBooleanExpression,
    OrObservationExpression,
    StringConstant,
)

from bam.errors import BamError

MAX_BUNDLE_BYTES = 64 << 20
MAX_INDICATORS = 200_000
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA256_NAMES = frozenset({"SHA-256", "SHA256", "sha256", "sha-256"})


class IntelError(BamError):
    """The bundle is not STIX 2.1 JSON that this module can read."""


@dataclass(frozen=True)
class Indicator:
    """One malicious file hash and the indicator that names it."""

    stix_id: str
    sha256: str
    name: str
    valid_until: float | None


@dataclass
class IntelBundle:
    """What a bundle contributes, and what was skipped and why (reason -> count)."""

    indicators: list[Indicator] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def parse_bundle(data: bytes | str, now: float) -> IntelBundle:
    """The usable SHA-256 indicators of a STIX 2.1 bundle (see the module docstring)."""
    size = len(data)
    if size > MAX_BUNDLE_BYTES:
        raise IntelError(f"the bundle is {size} bytes; at most {MAX_BUNDLE_BYTES} are accepted")
    try:
        bundle = stix2.parse(data, allow_custom=False, version="2.1")
    except (stix2.exceptions.STIXError, ValueError, TypeError, KeyError) as e:
        raise IntelError(f"not a valid STIX 2.1 bundle: {_first_line(e)}") from None
    if not isinstance(bundle, stix2.v21.Bundle):
        raise IntelError(f"expected a STIX bundle, got a {getattr(bundle, 'type', '?')!r}")
    names = _malware_names(bundle)
    out = IntelBundle()
    for obj in bundle.get("objects", []):
        if obj.type != "indicator":
            continue
        if len(out.indicators) >= MAX_INDICATORS:
            raise IntelError(f"more than {MAX_INDICATORS} indicator hashes in one bundle")
        if obj.get("revoked", False):
            out.skip("revoked")
            continue
        until = _timestamp(obj.get("valid_until"))
        if until is not None and until <= now:
            out.skip("expired")
            continue
        if obj.pattern_type != "stix":
            out.skip(f"pattern_type {obj.pattern_type}")
            continue
        hashes = _sha256_alternatives(obj.pattern)
        if hashes is None:
            out.skip("pattern not decidable from file hashes")
            continue
        if not hashes:
            out.skip("no SHA-256 file hash")
            continue
        name = obj.get("name") or names.get(obj.id) or obj.id
        out.indicators.extend(Indicator(obj.id, h, str(name)[:256], until) for h in sorted(hashes))
    return out


def _sha256_alternatives(pattern: str) -> set[str] | None:
    """The SHA-256 values of a purely disjunctive pattern (``None``: it is not one)."""
    found: set[str] = set()

    def walk(node: Any) -> bool:
        if isinstance(node, OrObservationExpression | OrBooleanExpression):
            return all(walk(op) for op in node.operands)
        if isinstance(node, ObservationExpression):
            return walk(node.operand)
        if isinstance(node, EqualityComparisonExpression):
            if node.negated or node.operator != "=":
                return False
            path = node.lhs
            steps = [getattr(c, "property_name", None) for c in path.property_path]
            if (
                path.object_type_name == "file"
                and len(steps) == 2
                and steps[0] == "hashes"
                and steps[1] in _SHA256_NAMES
                and isinstance(node.rhs, StringConstant)
            ):
                value = str(node.rhs.value).lower()
                if _SHA256.fullmatch(value):
                    found.add(value)
            return True  # another alternative (an MD5, a URL): not observable, not needed
        return False  # AND, FOLLOWEDBY, qualifiers, anything else

    try:
        tree = create_pattern_object(pattern, version="2.1")
    except Exception:  # the library already validated it: any failure means "not ours"
        return None
    return found if walk(tree) else None


def _malware_names(bundle: Any) -> dict[str, str]:
    """Indicator id -> the name of the malware it ``indicates`` (a nicer reason than an id)."""
    malware = {o.id: o.get("name") for o in bundle.get("objects", []) if o.type == "malware"}
    out: dict[str, str] = {}
    for o in bundle.get("objects", []):
        if o.type == "relationship" and o.relationship_type == "indicates":
            name = malware.get(o.target_ref)
            if name:
                out[o.source_ref] = str(name)
    return out


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
