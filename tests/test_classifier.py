"""The supervised attack classifier: separates families, persists safely, explains by names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bam.errors import ModelIntegrityError
from bam.evaluation.metrics import auc
from bam.models.classifier import NORMAL, AttackClassifier
from bam.syscalls import id_of
from conftest import adfa_path

CALLS = [id_of(c) for c in ("read", "write", "openat", "close", "fstat", "mmap")]


def runs(
    rng: np.random.Generator, n: int, inject: list[str] | None = None
) -> list[list[np.ndarray]]:
    out = []
    for _ in range(n):
        s = rng.choice(CALLS, 200)
        if inject:
            at = int(rng.integers(10, 190))
            s = np.concatenate([s[:at], [id_of(c) for c in inject], s[at:]])
        out.append([s.astype(np.int32)])
    return out


@pytest.fixture(scope="module")
def fitted() -> AttackClassifier:
    rng = np.random.default_rng(0)
    docs = (
        runs(rng, 60)
        + runs(rng, 30, ["socket", "connect", "dup2"])
        + runs(rng, 30, ["unlink", "rename"])
    )
    labels = [NORMAL] * 60 + ["reverse_shell"] * 30 + ["ransom"] * 30
    return AttackClassifier(min_df=1).fit(docs, labels)


def test_families_are_told_apart_with_probabilities(fitted: AttackClassifier) -> None:
    rng = np.random.default_rng(1)
    test = (
        runs(rng, 10)
        + runs(rng, 10, ["socket", "connect", "dup2"])
        + runs(rng, 10, ["unlink", "rename"])
    )
    p = fitted.predict_proba(test)
    assert np.allclose(p.sum(1), 1.0)
    assert fitted.predict(test) == [NORMAL] * 10 + ["reverse_shell"] * 10 + ["ransom"] * 10
    s = fitted.attack_score(test)
    assert s[:10].max() < s[10:].min()


def test_explain_names_the_phrase(fitted: AttackClassifier) -> None:
    rng = np.random.default_rng(2)
    doc = runs(rng, 1, ["socket", "connect", "dup2"])[0]
    top = " | ".join(c.feature for c in fitted.explain(doc, 5))
    assert "connect" in top or "socket" in top


def test_save_load_identical_and_tamper_refused(fitted: AttackClassifier, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    test = runs(rng, 5) + runs(rng, 5, ["unlink", "rename"])
    path = tmp_path / "clf.npz"
    mid = fitted.save(path)
    back = AttackClassifier.load(path, expect_model_id=mid)
    assert np.array_equal(back.predict_proba(test), fitted.predict_proba(test))
    assert back.save(tmp_path / "again.npz") == mid
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with pytest.raises(Exception, match="model"):
        AttackClassifier.load(tmp_path / "bad.npz")
    with pytest.raises(ModelIntegrityError):
        AttackClassifier.load(path, expect_model_id="sha256:" + "0" * 64)


def test_needs_two_classes() -> None:
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="two classes"):
        AttackClassifier().fit(runs(rng, 5), [NORMAL] * 5)


def test_adfa_run_disjoint_auc() -> None:
    from bam.traces.adfa import load_adfa_dataset

    data = load_adfa_dataset(adfa_path())
    train_norm = data.training
    test_norm = data.validation[1::8]
    att_tr = [t for t in data.attack if t.meta["run"] <= 5]
    att_te = [t for t in data.attack if t.meta["run"] > 5]
    clf = AttackClassifier(c=3.0).fit(
        train_norm + att_tr, [NORMAL] * len(train_norm) + [t.label or "?" for t in att_tr]
    )
    assert auc(clf.attack_score(test_norm), clf.attack_score(att_te)) > 0.93
