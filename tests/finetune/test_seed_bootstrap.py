"""The generic bootstrap: shared test draws pair inits, effective seeds count once, and the
simultaneous gap interval keeps its error rate where a re-picked percentile interval cannot."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.seed_bootstrap import bootstrap_seeds, difference_verdict
from finetune.stats import Resampling, Summary, weighted_auc
from finetune.subgroups import _extremes


def _auc_bootstrap(cells, labels, pairs=(), n_boot=300):
    res = Resampling.of(len(labels), None)
    truth = labels > 0

    def point(i, s):
        return {"auc": float(weighted_auc(truth, cells[i][s], np.ones((1, len(labels))))[0])}

    def replicate(i, s, w):
        return {"auc": weighted_auc(truth, cells[i][s], w)}

    return bootstrap_seeds(cells, point, replicate, res.weights, n_boot, 0.95, seed=0, pairs=pairs)


def test_inits_share_the_test_draws_so_a_difference_with_a_copy_is_exactly_zero():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = y + rng.normal(size=300)
    per_init, diffs = _auc_bootstrap({"a": {0: s}, "b": {0: s + 5.0}}, y, pairs=[("a", "b")])
    d = diffs[("a", "b")].metrics["auc"]
    assert (d.mean, d.lo, d.hi) == (0.0, 0.0, 0.0)
    a = per_init["a"].metrics["auc"]
    assert a.hi - a.lo > 0.05 and a.lo <= a.mean <= a.hi
    assert per_init["a"].replicates["auc"].shape == (300,)


def test_identical_seeds_are_one_effective_seed():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(size=200)
    one, _ = _auc_bootstrap({"a": {0: s}}, y)
    three, _ = _auc_bootstrap({"a": {0: s, 1: s.copy(), 2: s.copy()}}, y)
    assert three["a"].n_seeds == 3 and three["a"].n_effective_seeds == 1
    assert three["a"].metrics["auc"].lo == pytest.approx(one["a"].metrics["auc"].lo)


def test_difference_verdict_needs_the_whole_interval_on_one_side():
    assert difference_verdict(Summary(-0.1, -0.2, -0.01), "below", "above") == "below"
    assert difference_verdict(Summary(0.1, 0.01, 0.2), "below", "above") == "above"
    assert difference_verdict(Summary(0.1, -0.01, 0.2), "below", "above") == "no clear difference"
    assert difference_verdict(Summary(0.1, np.nan, np.nan), "below", "above") == "no clear difference"


def test_gap_interval_excludes_zero_about_five_percent_of_the_time_for_equal_groups():
    # Normal group estimates and replicates, 4 groups of equal truth: the simultaneous interval
    # of max - min should exclude 0 in ~5% of data sets; the percentile interval of re-picked
    # replicates (all > 0) would exclude it every time.
    rng = np.random.default_rng(2)
    names = [f"g{k}" for k in range(4)]
    excluded = percentile_excluded = planted_found = 0
    n_sets = 300
    for _ in range(n_sets):
        x = rng.normal(size=4) * 0.02 + 0.8
        x_gap = x + np.array([0.12, 0, 0, 0])   # the same, with one group truly better
        reps = x + rng.normal(size=(400, 4)) * 0.02
        points = {f"{g}/auc": v for g, v in zip(names, x)}
        _, gap, gap_reps = _extremes(points, {f"{g}/auc": reps[:, k] for k, g in enumerate(names)}, names,
                                     "auc", 0.95)
        excluded += gap["ci"][0] > 0
        percentile_excluded += np.quantile(gap_reps, 0.025) > 0
        reps_gap = x_gap + rng.normal(size=(400, 4)) * 0.02
        _, gap, _ = _extremes({f"{g}/auc": v for g, v in zip(names, x_gap)},
                              {f"{g}/auc": reps_gap[:, k] for k, g in enumerate(names)}, names, "auc", 0.95)
        planted_found += gap["ci"][0] > 0
    assert excluded / n_sets < 0.10
    assert percentile_excluded == n_sets
    assert planted_found / n_sets > 0.9
