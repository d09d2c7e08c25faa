"""The shipped Rego policy, policy validation errors, and the appraisal rules around it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from bam.server.policy import (
    PolicyError,
    PolicyVersion,
    default_source,
    evaluate,
    sample_inputs,
    validate,
)

DEFAULT = PolicyVersion("bam-default", 1, default_source())


def _input(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(sample_inputs()[0])
    for path, value in changes.items():
        target = doc
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("changes", "status", "action", "reason"),
    [
        ({}, "affirming", "allow", None),
        ({"behavior__severity": "medium"}, "warning", "monitor", "behavior_severity_medium"),
        (
            {"behavior__severity": "high"},
            "contraindicated",
            "investigate",
            "behavior_severity_high",
        ),
        (
            {"behavior__severity": "critical"},
            "contraindicated",
            "isolate",
            "behavior_severity_critical",
        ),
        (
            {"behavior__label": "reverse_shell", "behavior__probability": 0.95},
            "contraindicated",
            "terminate",
            "classifier_label_malicious: reverse_shell",
        ),
        (
            {"behavior__label": "odd", "behavior__probability": 0.7},
            "warning",
            "investigate",
            "classifier_label_suspicious: odd",
        ),
        ({"behavior__label": "odd", "behavior__probability": 0.2}, "affirming", "allow", None),
        (
            {"evidence__chain_gap": True, "evidence__chain_missing": 3},
            "warning",
            "monitor",
            "chain_gap: 3 token(s) missing",
        ),
        (
            {
                "measurements__reference": True,
                "measurements__mismatches": [{"path": "/usr/bin/x", "role": "exe"}],
            },
            "contraindicated",
            "isolate",
            "measurement_mismatch: /usr/bin/x",
        ),
        (
            {"trigger": "stale", "workload__stale": True, "behavior": None},
            "warning",
            "investigate",
            None,
        ),
    ],
)
def test_default_policy(
    changes: dict[str, Any], status: str, action: str, reason: str | None
) -> None:
    d = evaluate(DEFAULT, _input(**changes))
    assert (d.status, d.action) == (status, action)
    if reason is None:
        assert status != "affirming" or d.reasons == []
    else:
        assert reason in d.reasons


def test_behaviour_maps_onto_executables() -> None:
    assert evaluate(DEFAULT, _input()).trust_vector["executables"] == 2
    assert evaluate(DEFAULT, _input(behavior__severity="medium")).trust_vector["executables"] == 32
    assert (
        evaluate(DEFAULT, _input(behavior__severity="critical")).trust_vector["executables"] == 33
    )
    boot = _input(measurements__mismatches=[{"path": "/boot/vmlinuz", "role": "kernel"}])
    assert evaluate(DEFAULT, boot).trust_vector["executables"] == 96


def test_worst_finding_wins() -> None:
    d = evaluate(
        DEFAULT,
        _input(behavior__severity="medium", evidence__chain_gap=True, evidence__chain_missing=1),
    )
    assert (d.status, d.action) == ("warning", "monitor")
    assert len(d.reasons) == 2
    d = evaluate(
        DEFAULT,
        _input(behavior__severity="critical", behavior__label="exploit", behavior__probability=0.9),
    )
    assert (d.status, d.action) == ("contraindicated", "terminate")


@pytest.mark.parametrize(
    ("source", "reason", "fragment"),
    [
        (
            "package bam.policy\nimport rego.v1\n\nallow if {\n  input.x == \n}\n",
            "policy_invalid",
            "p.rego:5:",
        ),
        (
            "package bam.policy\nimport rego.v1\nd := d\ndecision := d\n",
            "policy_error",
            "Recursion",
        ),
        ("package bam.policy\nimport rego.v1\nx := 1\n", "policy_output_invalid", "undefined"),
        (
            'package bam.policy\nimport rego.v1\ndecision := {"status": "ok", "action": "allow"}\n',
            "policy_output_invalid",
            "status",
        ),
        ("", "policy_invalid", "empty"),
    ],
)
def test_broken_policies_are_refused_with_the_rego_error(
    source: str, reason: str, fragment: str
) -> None:
    with pytest.raises(PolicyError) as info:
        validate(source, "p")
    assert info.value.reason == reason
    assert fragment in info.value.message
    assert "(rego-" not in info.value.message  # a readable message, not the raw s-expression


def test_default_policy_validates() -> None:
    decisions = validate(default_source(), "bam-default")
    assert [d.status for d in decisions] == [
        "affirming",
        "contraindicated",  # attacked
        "warning",  # chain gap
        "warning",  # chain reset
        "contraindicated",  # measurement mismatch
        "contraindicated",  # a file threat intelligence knows
        "warning",  # stale
    ]
    assert any(r.startswith("chain_reset") for r in decisions[3].reasons)


def test_lean_input_gives_the_same_decisions_as_regopy_input() -> None:
    import regopy

    from bam.server.policy import ENTRYPOINT, _Compiled, _set_input

    compiled = _Compiled(default_source(), "default.rego")
    from regopy.rego_shared import (
        rego_bundle_query_entrypoint,
        rego_free_output,
        rego_output_string,
    )

    def query() -> str:
        impl = rego_bundle_query_entrypoint(
            compiled.interp._impl, compiled.bundle._impl, ENTRYPOINT
        )
        try:
            return str(rego_output_string(impl))
        finally:
            rego_free_output(impl)

    odd = _input(workload__name='é "quoted" \\ \u2028', evidence__seq=2**40)
    for doc in [*sample_inputs(), odd]:
        compiled.interp.set_input(regopy.Input(doc))
        expected = query()
        _set_input(compiled.interp, doc)
        assert query() == expected
    with pytest.raises(ValueError, match="cannot convert"):
        _set_input(compiled.interp, {"bad": object()})


def test_decisions_of_pure_policies_are_cached_and_impure_ones_are_not() -> None:
    from bam.server import policy as p

    p.DECISIONS.clear()
    doc = _input()
    first = evaluate(DEFAULT, doc)
    assert evaluate(DEFAULT, copy.deepcopy(doc)) is first  # same input: from the cache
    assert evaluate(DEFAULT, _input(behavior__severity="critical")).status == "contraindicated"
    newer = PolicyVersion("bam-default", 2, default_source() + "\n# v2\n")
    assert evaluate(newer, doc) is not first  # the policy version is part of the key
    impure = PolicyVersion("clock", 1, default_source() + "\nnow_ns := time.now_ns()\n")
    before = len(p.DECISIONS)
    evaluate(impure, doc)
    assert len(p.DECISIONS) == before  # a policy reading the clock is never cached
