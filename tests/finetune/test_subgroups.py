"""Per-subgroup metrics at the validation operating point, worst group, gap and its comparison."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from finetune.metrics import evaluate
from finetune.stats import Resampling
from finetune.subgroups import NOT_ESTIMABLE, subgroup_group
from finetune.thresholds import choose_thresholds, decision_matrix, operating_metrics

REF = "ssl:pub"


def _scores(y: np.ndarray, signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Binary ``[N, 2]`` scores whose separation of the classes is ``signal`` per image."""
    p = 1 / (1 + np.exp(-(signal * (2 * y[:, 0] - 1) + rng.normal(size=len(y)))))
    return np.c_[1 - p, p]


def _site_data(rng: np.random.Generator, n_patients: int = 400, k: int = 2):
    patients = np.repeat(np.arange(n_patients), k)
    y = np.repeat(rng.integers(0, 2, n_patients), k)[:, None]
    site = np.where(patients < n_patients // 2, "A", "B").astype(object)
    return patients, y, site


def _run(y, attrs, cells, patients=None, n_boot=300, **kw):
    return subgroup_group("binary-class", y, y, attrs, cells, cells, Resampling.of(len(y), patients),
                          n_boot, 0.95, seed=0, reference=REF, **kw)


def test_signal_in_one_site_only_gives_auc_near_one_there_chance_elsewhere_and_the_gap_says_so():
    rng = np.random.default_rng(0)
    patients, y, site = _site_data(rng)
    only_a = _scores(y, np.where(site == "A", 3.0, 0.0), rng)   # labels carry signal in site A only
    both = _scores(y, np.full(len(y), 3.0), rng)
    out = _run(y, {"site": site}, {REF: {0: only_a}, "imagenet": {0: both}}, patients)
    block = out[REF]["attributes"]["site"]
    a, b = block["groups"]["A"]["auc"], block["groups"]["B"]["auc"]
    assert a["mean"] > 0.95 and a["ci"][0] > 0.9
    assert abs(b["mean"] - 0.5) < 0.08 and b["ci"][0] < 0.5 < b["ci"][1]
    gap = block["gap"]["auc"]
    assert gap["max_group"] == "A" and gap["min_group"] == "B"
    assert gap["mean"] > 0.35 and gap["ci"][0] > 0.25 and gap["ci"][0] <= gap["mean"] <= gap["ci"][1]
    assert block["worst"]["auc"]["group"] == "B"
    # ImageNet's scores separate both sites alike: no clear gap; SSL's gap is the larger.
    other = out["imagenet"]["attributes"]["site"]
    assert other["gap"]["auc"]["ci"][0] == 0.0
    assert other["gap_vs_ssl"]["auc"]["verdict"] == "SSL widens the gap"
    assert "gap_vs_ssl" not in block
    # Point estimates are medmnist's AUC on the group's images.
    m = site == "A"
    assert a["mean"] == pytest.approx(evaluate(y[m], only_a[m], "binary-class")[0])
    # Reversed roles: SSL separates both sites, ImageNet only one -> SSL narrows the gap.
    out = _run(y, {"site": site}, {REF: {0: both}, "imagenet": {0: only_a}}, patients)
    assert out["imagenet"]["attributes"]["site"]["gap_vs_ssl"]["auc"]["verdict"] == "SSL narrows the gap"


def test_groups_with_equal_signal_have_a_gap_interval_covering_zero():
    rng = np.random.default_rng(1)
    patients, y, site = _site_data(rng, 600)
    s = _scores(y, np.full(len(y), 1.0), rng)
    out = _run(y, {"site": site}, {REF: {0: s}}, patients)
    gap = out[REF]["attributes"]["site"]["gap"]
    for metric in ("auc", "acc", "sensitivity", "specificity"):
        assert gap[metric]["ci"][0] == 0.0, metric   # clipped at 0: the interval reaches it


def test_one_class_and_small_subgroups_report_not_estimable_never_a_number():
    rng = np.random.default_rng(2)
    patients, y, _ = _site_data(rng)
    view = np.where(rng.random(len(y)) < 0.5, "PA", "AP").astype(object)
    view[y[:, 0] == 1] = "PA"                       # AP holds negatives only: one class
    sex = rng.choice(["F", "M"], len(y)).astype(object)
    sex[:6] = "X"                                   # 3 patients: below min_count
    sex[6:20] = None                                # unknown: left out, counted
    s = _scores(y, np.full(len(y), 2.0), rng)
    out = _run(y, {"view": view, "sex": sex}, {REF: {0: s}, "random": {0: s[::-1].copy()}}, patients)[REF]
    ap = out["attributes"]["view"]["groups"]["AP"]
    assert ap["status"] == NOT_ESTIMABLE and "one class only" in ap["reason"]
    assert not {"auc", "acc", "sensitivity", "specificity"} & set(ap)
    assert out["attributes"]["view"]["gap"]["status"] == NOT_ESTIMABLE
    x = out["attributes"]["sex"]["groups"]["X"]
    assert x["status"] == NOT_ESTIMABLE and "3 test patients (needs >= 20)" in x["reason"]
    assert out["attributes"]["sex"]["n_missing"] == 14
    assert set(out["attributes"]["sex"]["groups"]) == {"F", "M", "X"}
    assert out["attributes"]["sex"]["groups"]["F"]["status"] == "ok"
    assert out["attributes"]["sex"]["gap"]["status"] == "ok"


def test_subgroup_intervals_resample_patients():
    rng = np.random.default_rng(3)
    n = 300
    y = rng.integers(0, 2, n)[:, None]
    site = np.where(np.arange(n) < n // 2, "A", "B").astype(object)
    s = _scores(y, np.where(site == "A", 2.0, 0.5), rng)
    one = _run(y, {"site": site}, {REF: {0: s}}, np.arange(n))[REF]["attributes"]["site"]
    rep = np.repeat(np.arange(n), 3)
    many = _run(y[rep], {"site": site[rep]}, {REF: {0: s[rep]}}, rep)[REF]["attributes"]["site"]
    for g in ("A", "B"):
        assert many["groups"][g]["auc"]["ci"] == pytest.approx(one["groups"][g]["auc"]["ci"])
        assert many["groups"][g]["n_units"] == n // 2 and many["groups"][g]["n_images"] == 3 * n // 2
    assert many["gap"]["auc"]["ci"] == pytest.approx(one["gap"]["auc"]["ci"])


def test_thresholds_are_youden_on_validation_and_multiclass_is_macro():
    # Binary: validation scores separate at 0.3; Youden's J picks the lowest positive score.
    yv = np.array([[0], [0], [0], [1], [1], [1]])
    sv = np.array([0.1, 0.2, 0.25, 0.3, 0.6, 0.9])
    thr = choose_thresholds(yv, np.c_[1 - sv, sv], "binary-class")
    assert thr.values.tolist() == [0.3] and thr.chosen.all()
    t, d, c = decision_matrix(yv, np.c_[1 - sv, sv], "binary-class", thr)
    m = operating_metrics(t, d, c, np.ones((1, 6)))
    assert m["sensitivity"][0] == 1.0 and m["specificity"][0] == 1.0 and m["acc"][0] == 1.0
    # One class in validation: 0.5, marked not chosen.
    thr = choose_thresholds(np.zeros((4, 1)), np.c_[1 - sv[:4], sv[:4]], "binary-class")
    assert thr.values.tolist() == [0.5] and not thr.chosen.any()
    # Multi-class: argmax; macro sensitivity is the balanced accuracy.
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 200)[:, None]
    s = rng.dirichlet(np.ones(3), 200)
    s[np.arange(200), y[:, 0]] += rng.random(200)
    thr = choose_thresholds(y, s, "multi-class")
    assert thr.values is None and thr.rule == "argmax"
    t, d, c = decision_matrix(y, s, "multi-class", thr)
    m = operating_metrics(t, d, c, np.ones((1, 200)))
    assert m["sensitivity"][0] == pytest.approx(balanced_accuracy_score(y[:, 0], s.argmax(1)))
    assert m["acc"][0] == pytest.approx(np.mean(s.argmax(1) == y[:, 0]))
    # Multi-label: one threshold per label.
    yl = rng.integers(0, 2, (100, 4))
    thr = choose_thresholds(yl, rng.random((100, 4)), "multi-label, binary-class")
    assert thr.values.shape == (4,)


def test_multiclass_subgroups_score_every_class():
    rng = np.random.default_rng(5)
    n = 600
    y = rng.integers(0, 3, n)[:, None]
    s = rng.dirichlet(np.ones(3), n)
    site = np.where(np.arange(n) % 2 == 0, "A", "B").astype(object)
    s[site == "A", y[site == "A", 0]] += 2.0      # informative in A only
    s /= s.sum(axis=1, keepdims=True)
    out = subgroup_group("multi-class", y, y, {"site": site}, {REF: {0: s}}, {REF: {0: s}},
                         Resampling.of(n, None), 200, 0.95)[REF]["attributes"]["site"]
    assert out["groups"]["A"]["auc"]["mean"] > 0.9
    assert out["groups"]["B"]["auc"]["mean"] < 0.6
    assert out["gap"]["auc"]["ci"][0] > 0.2
    # A class with too few examples in a group makes that group not estimable.
    y2 = y.copy()
    y2[(site == "B") & (y[:, 0] == 2)] = 1
    out = subgroup_group("multi-class", y2, y2, {"site": site}, {REF: {0: s}}, {REF: {0: s}},
                         Resampling.of(n, None), 50, 0.95)[REF]["attributes"]["site"]
    assert out["groups"]["B"]["status"] == NOT_ESTIMABLE and "class 2" in out["groups"]["B"]["reason"]
