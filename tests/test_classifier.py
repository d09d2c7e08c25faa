"""The supervised attack classifier: behaviour on synthetic traces, persistence, and ADFA-LD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bam.errors import ModelIntegrityError
from bam.evaluation.classifier_eval import evaluate_classifier, run_disjoint
from bam.events import SyscallBatch, Trace
from bam.models.classifier import NORMAL, AttackClassifier, default_groups
from bam.models.persistence import load_artifact
from bam.syscalls import canonical_names, id_of
from bam.traces.adfa import AdfaDataset, load_adfa_dataset

BENIGN = ["open", "fstat", "mmap", "read", "write", "close", "brk", "lseek"]
PAYLOADS = {
    "reverse_shell": ["socket", "connect", "dup2", "dup2", "dup2", "execve"],
    "encryptor": ["open", "read", "getrandom", "write", "rename", "unlink"],
}


def _ids(names: list[str]) -> np.ndarray:
    return np.array([id_of(n) for n in names], dtype=np.int32)


def _benign(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random walk that mostly follows open-fstat-mmap-read-write-close-brk-lseek order."""
    state = int(rng.integers(len(BENIGN)))
    out = []
    for _ in range(n):
        out.append(BENIGN[state])
        state = (state + 1) % len(BENIGN) if rng.random() < 0.8 else int(rng.integers(len(BENIGN)))
    return _ids(out)


def _doc(rng: np.random.Generator, label: str) -> np.ndarray:
    base = _benign(rng, int(rng.integers(80, 160)))
    if label == NORMAL:
        return base
    payload = _ids(PAYLOADS[label] * int(rng.integers(2, 5)))
    cut = int(rng.integers(len(base)))
    return np.concatenate([base[:cut], payload, base[cut:]])


def _corpus(seed: int, n_normal: int, n_attack: int) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    labels = [NORMAL] * n_normal + [f for f in PAYLOADS for _ in range(n_attack)]
    return [_doc(rng, lab) for lab in labels], labels


@pytest.fixture(scope="module")
def fitted() -> AttackClassifier:
    docs, labels = _corpus(0, 60, 20)
    return AttackClassifier().fit(docs, labels)


def test_separable_families_are_told_apart(fitted: AttackClassifier) -> None:
    docs, labels = _corpus(1, 30, 10)
    assert fitted.classes_ == sorted([NORMAL, *PAYLOADS])
    assert fitted.predict(docs) == labels


def test_probabilities_sum_to_one_and_score_is_one_minus_benign(fitted: AttackClassifier) -> None:
    docs, labels = _corpus(2, 20, 5)
    p = fitted.predict_proba(docs)
    assert p.shape == (len(docs), len(fitted.classes_))
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.all((p >= 0) & (p <= 1))
    s = fitted.score(docs)
    assert np.allclose(s, 1.0 - p[:, fitted.classes_.index(NORMAL)])
    y = np.array([lab != NORMAL for lab in labels])
    assert s[y].min() > s[~y].max()
    assert fitted.temperature_ > 0


def test_documents_in_any_form_and_threads_kept_apart(fitted: AttackClassifier) -> None:
    rng = np.random.default_rng(3)
    a, b = _doc(rng, NORMAL), _doc(rng, "reverse_shell")
    # one trace, two threads interleaved in capture order
    tid = np.r_[np.zeros(len(a), np.int32), np.ones(len(b), np.int32)]
    order = np.argsort(np.r_[np.arange(len(a)) * 2, np.arange(len(b)) * 2 + 1], kind="stable")
    sid = np.r_[a, b][order]
    batch = SyscallBatch(
        ts=np.arange(len(sid), dtype=np.float64),
        pid=np.zeros(len(sid), np.int32),
        tid=tid[order],
        sid=sid,
    )
    trace = Trace("t", batch)
    as_threads = fitted.transform([[a, b]])
    assert (fitted.transform([trace]) != as_threads).nnz == 0
    assert (fitted.transform([np.r_[a, b]]) != as_threads).nnz > 0  # joining would invent n-grams
    assert (fitted.transform([list(a.tolist())]) != fitted.transform([a])).nnz == 0


def test_save_load_round_trip_is_identical(fitted: AttackClassifier, tmp_path: Path) -> None:
    path = tmp_path / "clf.bam.npz"
    model_id = fitted.save(path)
    loaded = AttackClassifier.load(path, expect_model_id=model_id)
    assert loaded.model_id_ == model_id
    docs, _ = _corpus(4, 10, 5)
    assert np.array_equal(loaded.predict_proba(docs), fitted.predict_proba(docs))
    assert loaded.predict(docs) == fitted.predict(docs)
    assert loaded.explain(docs[-1]) == fitted.explain(docs[-1])
    assert loaded.save(tmp_path / "again.npz") == model_id  # bit-identical state
    meta, arrays, _ = load_artifact(path, "attack-classifier")
    assert "execve" in meta["vocab"]  # the vocabulary is stored as names, not canonical ids
    assert all(a.dtype.kind in "biuf" for a in arrays.values())


def test_tampered_model_is_refused(fitted: AttackClassifier, tmp_path: Path) -> None:
    path = tmp_path / "clf.npz"
    model_id = fitted.save(path)
    with np.load(path, allow_pickle=False) as z:
        content = {k: z[k] for k in z.files}
    content["coef"] = content["coef"].copy()
    content["coef"][0, 0] += 1.0  # e.g. to make one attack family look benign
    np.savez_compressed(path, **content)
    with pytest.raises(ModelIntegrityError, match="does not match"):
        AttackClassifier.load(path)
    good = tmp_path / "good.npz"
    fitted.save(good)
    with pytest.raises(ModelIntegrityError, match="not the expected"):
        AttackClassifier.load(good, expect_model_id="sha256:" + "0" * 64)
    assert AttackClassifier.load(good, expect_model_id=model_id).model_id_ == model_id


def test_explain_names_the_payload_by_syscall_names(fitted: AttackClassifier) -> None:
    rng = np.random.default_rng(5)
    top = fitted.explain(_doc(rng, "reverse_shell"), top=5)
    assert top
    assert all(c.score > 0 for c in top)
    assert [c.score for c in top] == sorted((c.score for c in top), reverse=True)
    names = set(canonical_names())
    grams = [c.feature for c in top if not c.feature.startswith("unseen")]
    assert grams
    assert all(set(g.split()) <= names for g in grams)
    payload = set(PAYLOADS["reverse_shell"]) - set(BENIGN)
    assert any(set(c.feature.split()) & payload for c in top)


def test_calls_never_seen_in_training_count_as_novel(fitted: AttackClassifier) -> None:
    rng = np.random.default_rng(6)
    base = _doc(rng, NORMAL)
    odd = np.r_[base, _ids(["ptrace", "init_module", "kexec_load"] * 5)]
    assert fitted.score([odd])[0] > fitted.score([base])[0]
    assert fitted.score([np.empty(0, np.int32)]).shape == (1,)


def test_bad_input_is_refused() -> None:
    docs, labels = _corpus(7, 10, 3)
    with pytest.raises(ValueError, match="labels"):
        AttackClassifier().fit(docs, labels[:-1])
    with pytest.raises(ValueError, match="two classes"):
        AttackClassifier().fit(docs, [NORMAL] * len(docs))
    with pytest.raises(ValueError, match="benign"):
        AttackClassifier().fit(docs, ["a" if lab == NORMAL else "b" for lab in labels])
    with pytest.raises(ValueError, match="not fitted"):
        AttackClassifier().predict(docs)
    with pytest.raises(ValueError, match="C must be positive"):
        AttackClassifier(C=0.0).fit(docs, labels)


def test_grid_of_C_is_chosen_by_group_cross_validation() -> None:
    docs, labels = _corpus(8, 40, 12)
    clf = AttackClassifier(C=(0.1, 10.0), cv=3).fit(docs, labels)
    assert set(clf.cv_scores_) == {"0.1", "10"}
    assert clf.C_ in (0.1, 10.0)
    assert clf.cv_scores_[f"{clf.C_:g}"] == max(clf.cv_scores_.values())


def test_default_groups_keep_attack_runs_together() -> None:
    ev = SyscallBatch.from_ids(_ids(["read"]))
    docs = [Trace(f"a{i}", ev, "X", {"run": 1 + i % 2}) for i in range(4)] + [
        Trace(f"n{i}", ev, NORMAL) for i in range(20)
    ]
    groups = default_groups(docs, [d.label or "" for d in docs])
    assert groups[:4] == ["X/run1", "X/run2", "X/run1", "X/run2"]
    assert len(set(groups[4:])) == 10
    assert groups[4] == groups[5]


def _synthetic_adfa(seed: int) -> AdfaDataset:
    rng = np.random.default_rng(seed)

    def trace(name: str, label: str, meta: dict[str, int] | None = None) -> Trace:
        return Trace(
            name,
            SyscallBatch.from_ids(_doc(rng, label)),
            label,
            meta or {},
        )

    attack = [
        trace(f"{fam}_{run}/{i}", fam, {"run": run})
        for fam in PAYLOADS
        for run in range(1, 11)
        for i in range(2)
    ]
    return AdfaDataset(
        training=[trace(f"T{i}", NORMAL) for i in range(30)],
        validation=[trace(f"V{i:03d}", NORMAL) for i in range(40)],
        attack=attack,
    )


def test_evaluate_classifier_reports_the_documented_shape() -> None:
    r = evaluate_classifier(_synthetic_adfa(9))
    rd, lo = r["run_disjoint"], r["leave_one_type_out"]
    for key in ("auc", "ap", "accuracy_family", "brier", "ece", "fit_s", "score_s"):
        assert isinstance(rd[key], float), key
    assert rd["train"] == {"normal": 50, "attack": 20}
    assert rd["test"] == {"normal": 20, "attack": 20}
    assert rd["auc"] == 1.0
    assert set(lo["per_type"]) == set(PAYLOADS)
    assert lo["mean_auc"] == pytest.approx(np.mean(list(lo["per_type"].values())), abs=1e-4)


def test_adfa_ld_run_disjoint(adfa_root: Path) -> None:
    """Attack runs 1-5 (+ benign) train, runs 6-10 (+ unseen benign) test: no run leaks."""
    data = load_adfa_dataset(adfa_root)
    r = run_disjoint(data)
    assert r["auc"] >= 0.95, r
    assert r["brier"] < 0.06, r
    assert r["test"]["attack"] > 300
    assert r["test"]["normal"] > 2000
