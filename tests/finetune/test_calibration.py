"""ECE (equal-width and equal-mass), temperature scaling on validation, and their intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit, softmax
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
)

from finetune.calibration import (
    MULTILABEL,
    apply_temperature,
    calibration_group,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from finetune.stats import Resampling

# Binary scores (last column = P(positive)) with a confidence of exactly 1.0 that is WRONG next
# to a right 0.95 in the same top bin: merging them or not changes the ECE.
HAND_P = np.array([1.0, 0.95, 0.7, 0.62, 0.25])
HAND_Y = np.array([[0], [1], [1], [0], [0]])


def test_hand_computed_equal_width_ece_puts_confidence_one_in_the_last_bin():
    # top-label confidences 1.0, 0.95, 0.7, 0.62, 0.75; correct 0, 1, 1, 0, 1.
    # 15 bins: [14/15, 1] holds 1.0 and 0.95 -> |1 - 1.95| / 5 = 0.19; 0.7 (bin 10) -> 0.3 / 5;
    # 0.62 (bin 9) -> 0.62 / 5; 0.75 (bin 11) -> 0.25 / 5. Sum 0.424. A 16th bin of its own for
    # 1.0 (torch.bucketize with right=True, as torchmetrics bins) would give 0.444.
    scores = np.c_[1 - HAND_P, HAND_P]
    ece, per_label = expected_calibration_error(HAND_Y, scores, "binary-class")
    assert per_label is None
    assert ece == pytest.approx(0.424, abs=1e-12)
    rel = reliability_bins(HAND_Y, scores, "binary-class")
    assert rel["count"][14] == 2 and sum(rel["count"]) == 5
    assert rel["accuracy"][14] == pytest.approx(0.5) and rel["confidence"][14] == pytest.approx(0.975)


def test_hand_computed_equal_mass_ece():
    # Three equal-mass bins: edges at the 1/3 and 2/3 quantiles (0.7167, 0.8833) of the sorted
    # confidences 0.62, 0.7, 0.75, 0.95, 1.0 -> {0.62, 0.7}, {0.75}, {0.95, 1.0}:
    # |1 - 1.32| / 5 + |1 - 0.75| / 5 + |1 - 1.95| / 5 = 0.064 + 0.05 + 0.19 = 0.304.
    scores = np.c_[1 - HAND_P, HAND_P]
    ece, _ = expected_calibration_error(HAND_Y, scores, "binary-class", n_bins=3, binning="mass")
    assert ece == pytest.approx(0.304, abs=1e-12)
    assert reliability_bins(HAND_Y, scores, "binary-class", n_bins=3, binning="mass")["count"] == [2, 1, 2]


def test_equal_width_ece_matches_torchmetrics():
    rng = np.random.default_rng(0)
    n, c = 2000, 5
    z = rng.normal(size=(n, c)) * 1.5
    probs = softmax(z * 1.7, axis=1)
    y = np.array([rng.choice(c, p=p) for p in softmax(z, axis=1)])[:, None]
    ours, _ = expected_calibration_error(y, probs, "multi-class")
    ref = multiclass_calibration_error(torch.tensor(probs), torch.tensor(y[:, 0]), num_classes=c, n_bins=15)
    assert ours == pytest.approx(ref.item(), abs=1e-6)
    # Binary, top-label: torchmetrics' multiclass form on [1 - p, p] is the same definition.
    p = expit(z[:, 0] * 2)
    yb = (rng.random(n) < expit(z[:, 0])).astype(int)[:, None]
    ours, _ = expected_calibration_error(yb, np.c_[1 - p, p], "binary-class")
    ref = multiclass_calibration_error(torch.tensor(np.c_[1 - p, p]), torch.tensor(yb[:, 0]), num_classes=2, n_bins=15)
    assert ours == pytest.approx(ref.item(), abs=1e-6)
    # Multi-label: per-label probability against presence, as BinaryCalibrationError.
    yl = (rng.random((n, c)) < expit(z)).astype(int)
    macro, per = expected_calibration_error(yl, expit(z * 2), MULTILABEL)
    refs = [binary_calibration_error(torch.tensor(expit(z[:, k] * 2)), torch.tensor(yl[:, k]), n_bins=15).item()
            for k in range(c)]
    assert per == pytest.approx(refs, abs=1e-6)
    assert macro == pytest.approx(np.mean(refs), abs=1e-6)


def _planted(task: str, n: int, t0: float, rng: np.random.Generator):
    """Labels drawn from calibrated probabilities; scores whose logits are inflated by t0."""
    if task == "multi-class":
        z = rng.normal(size=(n, 4))
        y = (rng.random(n)[:, None] > np.cumsum(softmax(z, axis=1), axis=1)).sum(axis=1)[:, None]
        return y, softmax(t0 * z, axis=1)
    if task == "binary-class":
        z = rng.normal(size=n) * 1.5
        p = expit(t0 * z)
        return (rng.random(n) < expit(z)).astype(int)[:, None], np.c_[1 - p, p]
    z = rng.normal(size=(n, 3)) * 1.5 - 1.0
    return (rng.random((n, 3)) < expit(z)).astype(int), expit(t0 * z)


@pytest.mark.parametrize("task", ["binary-class", "multi-class", MULTILABEL])
def test_temperature_fitted_on_validation_recovers_a_planted_temperature(task):
    rng = np.random.default_rng(1)
    t0 = 2.5
    yv, sv = _planted(task, 6000, t0, rng)
    yt, st = _planted(task, 10000, t0, rng)
    temp = fit_temperature(yv, sv, task)
    assert temp.fitted.all()
    assert np.all(np.abs(temp.values / t0 - 1) < 0.10), temp.values
    before, _ = expected_calibration_error(yt, st, task)
    after, _ = expected_calibration_error(yt, apply_temperature(st, task, temp), task)
    assert before > 0.05  # the planted over-confidence is visible
    assert after < 0.02
    assert apply_temperature(st, task, temp).shape == st.shape


def test_multilabel_label_with_one_class_in_validation_keeps_temperature_one():
    rng = np.random.default_rng(2)
    y, s = _planted(MULTILABEL, 3000, 2.0, rng)
    y[:, 1] = 0
    temp = fit_temperature(y, s, MULTILABEL)
    assert temp.fitted.tolist() == [True, False, True]
    assert temp.values[1] == 1.0
    shared = fit_temperature(y, s, MULTILABEL, per_label=False)
    assert shared.values.shape == (1,) and shared.fitted.all()


def _group(labels, val_labels, cells, val_cells, patients=None, n_boot=200, reference="ssl:pub", task="binary-class"):
    return calibration_group(task, labels, val_labels, cells, val_cells, Resampling.of(len(labels), patients),
                             n_boot, 0.95, seed=0, reference=reference)


def test_calibration_group_noise_floor_verdicts_and_paired_difference():
    rng = np.random.default_rng(3)

    def split(n: int):
        """Labels drawn from expit(z); a calibrated model (expit z) and an over-confident one."""
        z = rng.normal(size=n) * 1.5
        y = (rng.random(n) < expit(z)).astype(int)[:, None]
        return y, np.c_[1 - expit(z), expit(z)], np.c_[1 - expit(3 * z), expit(3 * z)]

    yv2, sv_ok, sv_bad = split(3000)
    yt2, st_ok, st_bad = split(3000)
    out = _group(yt2, yv2, {"ssl:pub": {0: st_ok}, "random": {0: st_bad}},
                 {"ssl:pub": {0: sv_ok}, "random": {0: sv_bad}})
    ok, bad = out["ssl:pub"]["ece"]["width"], out["random"]["ece"]["width"]
    assert ok["before"]["verdict"] == "within the noise floor"
    assert bad["before"]["verdict"] == "above the noise floor"
    assert bad["after"]["verdict"] == "within the noise floor"
    lo, hi = bad["before"]["ci"]
    assert lo <= bad["before"]["mean"] <= hi  # clearly miscalibrated: the bias is negligible
    assert bad["after"]["mean"] < bad["before"]["mean"] / 3
    d = out["random"]["diff_vs_ssl"]["width"]["before"]
    assert d["ci"][1] < 0 and d["verdict"] == "SSL better calibrated"
    assert "diff_vs_ssl" not in out["ssl:pub"]
    t = out["random"]["temperature"]["per_seed"]["0"]["values"][0]
    assert t == pytest.approx(3.0, rel=0.15)
    assert out["random"]["kind"] == "top-label" and "per_label" not in out["random"]
    for binning in ("width", "mass"):
        assert sum(out["random"]["reliability"]["before"][binning]["count"]) == len(yt2)


def test_calibration_intervals_resample_patients_and_effective_seeds():
    rng = np.random.default_rng(4)
    n_pat, k = 300, 3
    y, s = _planted("binary-class", n_pat, 2.0, rng)
    one = _group(y, y, {"ssl:pub": {0: s}}, {"ssl:pub": {0: s}}, patients=np.arange(n_pat))
    # Each patient's image three times: the patient bootstrap gives exactly the same interval.
    rep = np.repeat(np.arange(n_pat), k)
    many = _group(y[rep], y[rep], {"ssl:pub": {0: s[rep]}}, {"ssl:pub": {0: s[rep]}}, patients=rep)
    assert many["ssl:pub"]["ece"]["width"]["before"]["ci"] == pytest.approx(one["ssl:pub"]["ece"]["width"]["before"]["ci"])
    assert many["ssl:pub"]["resampling"] == "patients" and many["ssl:pub"]["n_units"] == n_pat
    # Image resampling treats the copies as independent: a narrower interval.
    img = _group(y[rep], y[rep], {"ssl:pub": {0: s[rep]}}, {"ssl:pub": {0: s[rep]}})
    def width(e: dict) -> float:
        return float(np.diff(e["ssl:pub"]["ece"]["width"]["before"]["ci"])[0])

    assert width(img) < 0.8 * width(many)
    # Identical seeds are one effective seed.
    two = _group(y, y, {"ssl:pub": {0: s, 1: s.copy()}}, {"ssl:pub": {0: s, 1: s.copy()}})
    assert two["ssl:pub"]["n_seeds"] == 2 and two["ssl:pub"]["n_effective_seeds"] == 1


def test_multilabel_group_reports_per_label_ece_and_macro_mean():
    rng = np.random.default_rng(5)
    y, s = _planted(MULTILABEL, 2000, 2.0, rng)
    out = _group(y, y, {"ssl:pub": {0: s}}, {"ssl:pub": {0: s}}, task=MULTILABEL)["ssl:pub"]
    assert out["kind"] == "per-label" and out["temperature"]["scope"] == "per-label"
    per = out["per_label"]["width"]["before"]
    assert len(per) == 3
    assert out["ece"]["width"]["before"]["mean"] == pytest.approx(np.mean([p["mean"] for p in per]))
    assert len(out["temperature"]["per_seed"]["0"]["values"]) == 3
