"""Site shift: the folds' subsets, the drop with its interval, and the verdict's words."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.evaluation_config import ShiftConfig
from finetune.shift import (
    overall_shift_verdict,
    shift_entries,
    shift_folds,
    shift_group,
    shift_verdict,
)
from medssl.errors import MedsslError

REF = "ssl:pub"


def _attrs():
    attrs = {"train": ["A", "B", "C", "A", None, "B"], "val": ["A", "B", "C"],
             "test": ["A", "B", "C", "C", None, "A"]}
    patients = {"train": np.array(["p1", "p2", "p3", "p4", "p5", "p6"], dtype=object),
                "val": np.array(["p7", "p8", "p9"], dtype=object),
                "test": np.array(["p10", "p11", "p12", "p13", "p14", "p15"], dtype=object)}
    return attrs, patients


def test_holdout_fold_trains_and_selects_on_other_sites_and_tests_on_both():
    attrs, patients = _attrs()
    (fold,) = shift_folds(ShiftConfig(holdout=["C"]), attrs, patients)
    assert fold.holdout == "C"
    assert fold.train.tolist() == [0, 1, 3, 5] and fold.val.tolist() == [0, 1]
    assert fold.test_out.tolist() == [2, 3] and fold.test_in.tolist() == [0, 1, 5]
    assert fold.n_missing == {"train": 1, "val": 0, "test": 1}


def test_leave_one_out_makes_one_fold_per_test_site():
    attrs, patients = _attrs()
    folds = shift_folds(ShiftConfig(leave_one_out=True), attrs, patients)
    assert [f.holdout for f in folds] == ["A", "B", "C"]
    for f in folds:
        test = np.array(attrs["test"], dtype=object)
        assert set(test[f.test_out]) == {f.holdout}
        assert f.holdout not in set(test[f.test_in]) and None not in set(test[f.test_in])
        assert f.holdout not in {attrs["train"][i] for i in f.train}


def test_a_patient_seen_at_the_held_out_site_is_removed_from_the_other_side():
    attrs, patients = _attrs()
    patients["train"][0] = "p12"       # p12 has a test image at site C, and a train image at A
    (fold,) = shift_folds(ShiftConfig(holdout=["C"]), attrs, patients)
    assert 0 not in fold.train.tolist() and fold.n_shared_patient_images == 1


def test_bad_holdout_and_empty_sets_stop_with_a_clear_error():
    attrs, patients = _attrs()
    with pytest.raises(MedsslError, match=r"holdout \['Z'\] not found in 'site'; the task has \['A', 'B', 'C'\]"):
        shift_folds(ShiftConfig(holdout=["Z"]), attrs, patients, task_name="cxr")
    attrs["val"] = ["C", "C", "C"]
    with pytest.raises(MedsslError, match="site=C leaves no image in val"):
        shift_folds(ShiftConfig(holdout=["C"]), attrs, patients)
    with pytest.raises(MedsslError, match="needs 'site' for every split"):
        shift_folds(ShiftConfig(holdout=["C"]), {"train": [], "test": []}, patients)


def _binary(y: np.ndarray, signal: float, rng: np.random.Generator) -> np.ndarray:
    p = 1 / (1 + np.exp(-(signal * (2 * y[:, 0] - 1) + rng.normal(size=len(y)))))
    return np.c_[1 - p, p]


def _fold_data(rng, n_in=300, n_out=200, k=2):
    pin = np.repeat(np.arange(n_in), k)
    pout = np.repeat(np.arange(n_in, n_in + n_out), k)
    yin = np.repeat(rng.integers(0, 2, n_in), k)[:, None]
    yout = np.repeat(rng.integers(0, 2, n_out), k)[:, None]
    attrs = {"train": ["A"] * 4 + ["B"] * 2, "val": ["A", "B"], "test": ["A"] * len(yin) + ["C"] * len(yout)}
    (fold,) = shift_folds(ShiftConfig(holdout=["C"]), attrs, {"train": None, "val": None, "test": None})
    return fold, yin, yout, pin, pout


def test_drop_interval_and_verdict_name_the_init_that_loses_least():
    rng = np.random.default_rng(0)
    fold, yin, yout, pin, pout = _fold_data(rng)
    cells = {  # SSL keeps its signal at the new site; ImageNet loses it entirely.
        REF: {s: (_binary(yin, 2.0, rng), _binary(yout, 2.0, rng)) for s in (0, 1)},
        "imagenet": {s: (_binary(yin, 2.0, rng), _binary(yout, 0.0, rng)) for s in (0, 1)},
    }
    out = shift_group("binary-class", fold, yin, yout, pin, pout, cells, 300, 0.95, reference=REF)
    inet, ssl = out["imagenet"], out[REF]
    assert inet["drop"]["mean"] > 0.3 and inet["drop"]["ci"][0] > 0.2
    assert ssl["drop"]["ci"][0] < 0 < ssl["drop"]["ci"][1]
    assert inet["drop"]["mean"] == pytest.approx(inet["auc_in"]["mean"] - inet["auc_out"]["mean"])
    assert inet["resampling"] == "patients" and inet["n_units_in"] == 300 and inet["n_units_out"] == 200
    assert inet["n"] == {"train": 6, "val": 2, "test_in": 600, "test_out": 400}
    assert inet["drop_vs_ssl"]["ci"][1] < 0       # SSL's drop minus ImageNet's, paired
    assert ssl["drop_vs"]["imagenet"]["ci"][1] < 0
    text = shift_verdict(out)
    assert text.startswith("When site C is held out, ssl:pub loses least")
    drop = inet["drop"]
    assert f"imagenet drops {drop['mean']:+.3f} [{drop['ci'][0]:+.3f}, {drop['ci'][1]:+.3f}]" in text
    assert overall_shift_verdict({"C": out}) == "ssl:pub loses least at every held-out site (1)."
    entry = shift_entries({"C": out})["imagenet"]
    assert entry["attribute"] == "site" and entry["folds"]["C"]["verdict"] == text
    assert entry["folds"]["C"]["drop"] == inet["drop"] and entry["verdict"].startswith("ssl:pub loses least")


def test_verdict_claims_nothing_when_the_drops_are_alike():
    rng = np.random.default_rng(1)
    fold, yin, yout, pin, pout = _fold_data(rng)
    cells = {i: {0: (_binary(yin, 2.0, rng), _binary(yout, 1.5, rng))} for i in (REF, "imagenet", "random")}
    out = shift_group("binary-class", fold, yin, yout, pin, pout, cells, 300, 0.95, reference=REF)
    text = shift_verdict(out)
    assert "no init clearly loses less than the others (smallest point drop:" in text
    assert "loses least" not in text
    assert overall_shift_verdict({"C": out}).startswith("No init clearly loses least")


def test_drop_resamples_patients_of_each_test_set():
    rng = np.random.default_rng(2)
    fold, yin, yout, pin, pout = _fold_data(rng, k=1)
    cells = {REF: {0: (_binary(yin, 2.0, rng), _binary(yout, 1.0, rng))}}
    one = shift_group("binary-class", fold, yin, yout, pin, pout, cells, 200, 0.95)[REF]
    k = 3
    ri, ro = np.repeat(np.arange(len(yin)), k), np.repeat(np.arange(len(yout)), k)
    rep = {REF: {0: (cells[REF][0][0][ri], cells[REF][0][1][ro])}}
    many = shift_group("binary-class", fold, yin[ri], yout[ro], pin[ri], pout[ro], rep, 200, 0.95)[REF]
    assert many["drop"]["ci"] == pytest.approx(one["drop"]["ci"])
    assert many["n_units_out"] == one["n_units_out"] == len(yout)
