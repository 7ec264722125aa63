"""Metrics agree with medmnist's Evaluator; the bootstrap AUC agrees with sklearn."""

from __future__ import annotations

import medmnist
import numpy as np
import pytest
from finetune_data import write_medmnist_npz
from sklearn.metrics import roc_auc_score

from finetune.metrics import evaluate
from finetune.stats import bootstrap_group, replicate_metrics, weighted_auc

CASES = [  # flag, n_classes, multilabel
    ("breastmnist", 2, False),
    ("dermamnist", 7, False),
    ("chestmnist", 14, True),
    ("retinamnist", 5, False),
]


@pytest.mark.parametrize(("flag", "n_classes", "multilabel"), CASES)
def test_evaluate_matches_medmnist_evaluator(tmp_path, flag, n_classes, multilabel):
    sizes = {"train": 10, "val": 10, "test": 200}  # Evaluator reads labels only, no size check
    write_medmnist_npz(tmp_path, flag, sizes=sizes, n_classes=n_classes, multilabel=multilabel)
    evaluator = medmnist.Evaluator(flag, "test", root=str(tmp_path))
    labels = np.load(tmp_path / f"{flag}.npz")["test_labels"]
    rng = np.random.default_rng(1)
    scores = rng.random((200, n_classes))
    # Make the scores informative so a wrong column/threshold rule would change the numbers.
    if multilabel:
        scores = 0.6 * scores + 0.4 * labels
    else:
        scores[np.arange(200), labels[:, 0]] += 0.5
        scores /= scores.sum(axis=1, keepdims=True)
    expected = evaluator.evaluate(scores)
    auc, acc = evaluate(labels, scores, medmnist.INFO[flag]["task"])
    assert auc == pytest.approx(expected.AUC, abs=1e-12)
    assert acc == pytest.approx(expected.ACC, abs=1e-12)
    assert 0.6 < auc < 1.0


@pytest.mark.parametrize("ties", [True, False])
def test_weighted_auc_equals_sklearn_on_resamples(ties):
    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.3
    score = rng.random(300) + 0.3 * truth
    if ties:
        score = np.round(score, 2)
    weights = rng.multinomial(300, np.full(300, 1 / 300), size=5).astype(float)
    ours = weighted_auc(truth, score, weights)
    for b in range(5):
        ref = roc_auc_score(truth, score, sample_weight=weights[b])
        assert ours[b] == pytest.approx(ref, abs=1e-12)


def test_unit_weights_reproduce_point_metrics():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(150, 1))
    scores = rng.random((150, 4))
    scores[np.arange(150), labels[:, 0]] += 0.3
    auc, acc = replicate_metrics(labels, scores, "multi-class", np.ones((1, 150)))
    ref_auc, ref_acc = evaluate(labels, scores, "multi-class")
    assert auc[0] == pytest.approx(ref_auc) and acc[0] == pytest.approx(ref_acc)


def test_paired_difference_interval():
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 1)) < 0.5).astype(int)
    good = {s: np.c_[1 - (p := np.clip(labels[:, 0] * 0.3 + rng.random(400) * 0.7, 0, 1)), p] for s in range(3)}
    same = {s: good[s].copy() for s in range(3)}
    noise = {s: np.c_[1 - (p := rng.random(400)), p] for s in range(3)}
    cells = {"ssl:a": good, "copy": same, "random": noise}
    points = {i: {s: evaluate(labels, v, "binary-class") for s, v in d.items()} for i, d in cells.items()}
    per_init, diffs = bootstrap_group(labels, "binary-class", cells, points, "ssl:a", 200, 0.95)
    assert per_init["ssl:a"]["auc"].lo > 0.5
    assert per_init["random"]["auc"].lo <= 0.5 <= per_init["random"]["auc"].hi
    assert diffs["random"]["auc"].lo > 0  # clearly better than noise
    assert diffs["copy"]["auc"].mean == 0 and diffs["copy"]["auc"].lo == diffs["copy"]["auc"].hi == 0
