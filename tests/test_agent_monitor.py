"""A target refuses to profile while its workload is under an open alert; config is checked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from bam.agent.config import TargetSpec
from bam.agent.monitor import ProfileRefusedError, TargetMonitor
from bam.sensors.workload import Target
from sensors_support import bam_programs, require_ebpf


def test_profiling_is_refused_under_an_open_alert(tmp_path: Path) -> None:
    require_ebpf()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        spec = TargetSpec(name="held", pid=proc.pid, profile_s=1)
        mon = TargetMonitor(spec, tmp_path, open_alert=True)
        with pytest.raises(ProfileRefusedError, match="open alert"):
            mon.start()
        mon.close(stop_command=False)
        assert Target.from_pids([proc.pid]).alive()  # the workload itself is untouched
    finally:
        proc.kill()
        proc.wait()
    assert bam_programs() == []


def test_target_needs_exactly_one_kind() -> None:
    with pytest.raises(ValidationError, match="exactly one of command, pid, cgroup"):
        TargetSpec(name="x", pid=1, command=["true"])
    with pytest.raises(ValidationError, match="exactly one"):
        TargetSpec(name="x")


def test_classifier_names_the_anomaly_and_is_measured(tmp_path: Path) -> None:
    """A target with ``classifier = PATH``: the model is pinned, loaded when monitoring
    starts, listed in the measurements, and labels a window by family with a probability."""
    import numpy as np

    from bam.detect import Baseline
    from bam.events import SyscallBatch, Trace
    from bam.models import make_detector
    from bam.models.classifier import AttackClassifier
    from bam.syscalls import id_of

    rng = np.random.default_rng(7)
    normal_calls = np.array([id_of(n) for n in ("read", "write", "openat", "close", "fstat")])
    shell_calls = np.array([id_of(n) for n in ("clone", "execve", "wait4", "dup2", "pipe2")])

    def doc(calls: np.ndarray, n: int = 60) -> np.ndarray:
        return rng.choice(calls, n).astype(np.int32)

    docs = [doc(normal_calls) for _ in range(20)] + [
        np.concatenate([doc(normal_calls, 30), doc(shell_calls, 30)]) for _ in range(20)
    ]
    labels = ["normal"] * 20 + ["shell"] * 20
    clf_path = tmp_path / "clf"
    model_id = AttackClassifier(cv=2).fit(docs, labels).save(clf_path)

    with pytest.raises(ValidationError):
        TargetSpec(name="x", pid=1, classifier=clf_path, classifier_id=5)  # type: ignore[arg-type]
    spec = TargetSpec(name="c", pid=1, classifier=clf_path, classifier_id=model_id)
    mon = TargetMonitor(spec, tmp_path / "agent")
    base = Baseline(make_detector("stide"), window=10).fit(
        [Trace(f"n{i}", SyscallBatch.from_ids(doc(normal_calls, 200))) for i in range(8)]
    )
    mon.baseline_path.parent.mkdir(parents=True)
    base.save(mon.baseline_path)
    mon.baseline = Baseline.load(mon.baseline_path)
    mon._monitoring()
    try:
        roles = {m.role: m.model_id for m in mon.measurements().models}
        assert roles["classifier"] == model_id
        label, p = mon._classify(np.concatenate([doc(normal_calls, 8), doc(shell_calls, 30)]), "x")
        assert label == "shell"
        assert p > 0.5
        label, p = mon._classify(doc(normal_calls, 38), "anomalous_sequence")
        assert label == "anomalous_sequence"  # benign-looking: the rule's label stays
        assert p < 0.5
    finally:
        mon.close(stop_command=False)

    pinned = TargetSpec(name="c", pid=1, classifier=clf_path, classifier_id="0" * 64)
    mon = TargetMonitor(pinned, tmp_path / "agent2")
    base = Baseline(make_detector("stide"), window=10).fit(
        [Trace(f"n{i}", SyscallBatch.from_ids(doc(normal_calls, 200))) for i in range(8)]
    )
    mon.baseline_path.parent.mkdir(parents=True)
    base.save(mon.baseline_path)
    mon.baseline = Baseline.load(mon.baseline_path)
    from bam.errors import ModelIntegrityError

    with pytest.raises(ModelIntegrityError):
        mon._monitoring()
    mon.close(stop_command=False)
