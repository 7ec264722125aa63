"""Per-subgroup AUC, ACC, sensitivity and specificity, the worst group and the largest gap.

For each attribute of ``evaluation.subgroups`` (sex, age band, site, view; per test image, a
string or None where unknown), every init's test scores are scored within each group:

- AUC as medmnist defines it (point estimates through fairlearn's MetricFrame, each group's
  figure computed by finetune/metrics.py's medmnist call), ACC, sensitivity and specificity at
  the operating point chosen on VALIDATION (finetune/thresholds.py: Youden's J for binary and
  per label, argmax with macro one-vs-rest figures for multi-class);
- images whose attribute is unknown are left out of every group and counted (``n_missing``);
- a group is "not estimable" (a reason string, never a number) when it has fewer than
  ``min_count`` test units (patients where the task records them, else images) or, for any
  scored column (the positive class, each class, each label), fewer than ``min_per_class``
  units with it or without it (one class only is the extreme case). Estimability depends on the
  labels alone, so every init is scored on the same groups and their gaps are comparable.

Intervals (finetune/seed_bootstrap.py): one replicate resamples the test PATIENTS of the whole
test set (images where ids are unknown) and every group is scored on its own images under that
draw, so the groups of one replicate are paired and a patient whose images span groups (views)
counts in each with its draw count; effective seeds are resampled as for the AUC. Per group:
percentile intervals. The worst group (the minimum over estimable groups) and the largest gap
(maximum - minimum) pick extremes, and a percentile interval of a re-picked extreme is biased:
for two groups of equal AUC the replicates of max - min are all positive, so that interval
never covers 0. They get SIMULTANEOUS intervals instead (max-T): with c the ``confidence``
quantile over replicates of the range of the centred group replicates (x*_g - x_g), every
pairwise difference lies within +-c of its estimate at once, so the true largest gap lies in
[gap - c, gap + c]; likewise the worst value with c the quantile of max_g |x*_g - x_g|. In
simulation (2-6 equal groups) the gap's interval excluded 0 in 5% of cases, where a plain
percentile interval of re-picked max - min excluded it always. The points are those of the
mean over effective seeds: range and minimum of the per-group means.

The comparison between inits (``gap_vs_ssl``): reference gap - this init's gap, replicate by
replicate (same test draws), percentile interval: "SSL narrows the gap" when it lies below 0,
"SSL widens the gap" above, "no clear difference" otherwise. Each replicate re-picks both
extremes; in simulation that made the interval conservative (rarely a false claim).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from finetune.metrics import binary_columns, evaluate
from finetune.seed_bootstrap import bootstrap_seeds, difference_verdict, summary_json
from finetune.stats import Resampling, Summary, _interval, weighted_auc
from finetune.thresholds import Thresholds, choose_thresholds, decision_matrix, operating_metrics

METRICS = ("auc", "acc", "sensitivity", "specificity")
MIN_COUNT = 20
MIN_PER_CLASS = 5
NOT_ESTIMABLE = "not estimable"


def attribute_values(values: Sequence[Any]) -> np.ndarray:
    """``[N]`` object array of group names (str), None where unknown (None, NaN or empty)."""
    out = np.empty(len(values), dtype=object)
    for k, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
            out[k] = None
        else:
            out[k] = str(v)
    return out


def _column_names(task: str, n_cols: int) -> list[str]:
    if task == "binary-class":
        return ["the positive class"]
    if task == "multi-label, binary-class":
        return [f"label {k}" for k in range(n_cols)]
    return [f"class {k}" for k in range(n_cols)]


def estimability(labels: np.ndarray, task: str, n_cols: int, groups: np.ndarray, resampling: Resampling,
                 min_count: int = MIN_COUNT, min_per_class: int = MIN_PER_CLASS) -> dict[str, dict[str, Any]]:
    """group -> ``{"n_images", "n_units", "status": "ok" | "not estimable", "reason"?}`` for the
    known values of ``groups`` ``[N]`` (sorted by name). Uses the labels only."""
    y = labels.reshape(len(labels), -1)
    if task == "multi-label, binary-class":
        truth = y > 0
    elif task == "binary-class":
        truth = y[:, :1] > 0
    else:
        truth = y[:, :1] == np.arange(n_cols)[None, :]
    unit = "patients" if resampling.unit == "patients" else "images"
    out: dict[str, dict[str, Any]] = {}
    for g in sorted({v for v in groups if v is not None}):
        m = groups == g
        units = resampling.unit_of[m]
        entry: dict[str, Any] = {"n_images": int(m.sum()), "n_units": len(np.unique(units)), "status": "ok"}
        reason = None
        if entry["n_units"] < min_count:
            reason = f"{entry['n_units']} test {unit} (needs >= {min_count})"
        else:
            for k, name in enumerate(_column_names(task, n_cols)):
                pos = len(np.unique(units[truth[m, k]]))
                neg = len(np.unique(units[~truth[m, k]]))
                if min(pos, neg) < min_per_class:
                    which = "with" if pos < neg else "without"
                    lead = "one class only: " if min(pos, neg) == 0 else ""
                    reason = (f"{lead}{min(pos, neg)} test {unit} {which} {name} "
                              f"(needs >= {min_per_class} with and without)")
                    break
        if reason:
            entry.update(status=NOT_ESTIMABLE, reason=reason)
        out[g] = entry
    return out


def _group_points(labels: np.ndarray, scores: np.ndarray, task: str, thresholds: Thresholds,
                  groups: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """group -> metric -> point estimate, through fairlearn's MetricFrame (known values only)."""
    from fairlearn.metrics import MetricFrame

    known = np.array([g is not None for g in groups])

    def auc(y: np.ndarray, s: np.ndarray) -> float:
        return evaluate(y.reshape(len(y), -1), s, task)[0]

    def operating(key: str):
        def f(y: np.ndarray, s: np.ndarray) -> float:
            t, d, c = decision_matrix(y.reshape(len(y), -1), s, task, thresholds)
            return float(operating_metrics(t, d, c, np.ones((1, len(y))))[key][0])
        return f

    with warnings.catch_warnings():
        # Not-estimable groups may leave sklearn's AUC undefined; they are dropped below anyway.
        warnings.simplefilter("ignore")
        frame = MetricFrame(metrics={"auc": auc, **{k: operating(k) for k in METRICS[1:]}},
                            y_true=labels[known], y_pred=scores[known],
                            sensitive_features=groups[known].astype(str))
    by = frame.by_group
    return {g: {k: float(by.loc[g, k]) for k in METRICS} for g in names}


def _group_replicates(labels: np.ndarray, scores: np.ndarray, task: str, thresholds: Thresholds,
                      masks: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
    """``"{group}/{metric}"`` -> ``[B]`` under weights ``[B, N]``, each group on its own images."""
    truth, decision, correct = decision_matrix(labels, scores, task, thresholds)
    cols = binary_columns(labels, scores, task)
    out = {}
    for g, m in masks.items():
        w = weights[:, m]
        out[f"{g}/auc"] = np.mean([weighted_auc(t[m], s[m], w) for t, s in cols], axis=0)
        for k, v in operating_metrics(truth[m], decision[m], correct[m], w).items():
            out[f"{g}/{k}"] = v
    return out


def _extremes(summ_points: dict[str, float], reps: dict[str, np.ndarray], names: list[str],
              metric: str, confidence: float) -> tuple[dict, dict, np.ndarray]:
    """Worst value and largest gap of one metric over groups ``names``, with simultaneous
    intervals; also the ``[B]`` replicates of the re-picked gap (for comparisons)."""
    x = np.array([summ_points[f"{g}/{metric}"] for g in names])
    stack = np.stack([reps[f"{g}/{metric}"] for g in names], axis=1)  # [B, G]
    gap_reps = np.ptp(stack, axis=1)
    ok = np.all(np.isfinite(stack), axis=1)
    cen = stack[ok] - x[None, :]
    lo_g, hi_g = int(np.argmin(x)), int(np.argmax(x))
    worst_c = float(np.quantile(np.abs(cen).max(axis=1), confidence)) if len(cen) else np.nan
    worst = {"group": names[lo_g], **summary_json(Summary(x[lo_g], x[lo_g] - worst_c, x[lo_g] + worst_c), 0, 1)}
    gap = {"max_group": names[hi_g], "min_group": names[lo_g]}
    if len(names) > 1:
        c = float(np.quantile(np.ptp(cen, axis=1), confidence)) if len(cen) else np.nan
        g = x[hi_g] - x[lo_g]
        gap.update(summary_json(Summary(g, g - c, g + c), 0, 1))
    return worst, gap, gap_reps


def subgroup_group(task: str, test_labels: np.ndarray, val_labels: np.ndarray,
                   attributes: dict[str, Sequence[Any]], test_scores: dict[str, dict[int, np.ndarray]],
                   val_scores: dict[str, dict[int, np.ndarray]], resampling: Resampling, n_boot: int,
                   confidence: float, seed: int = 0, reference: str | None = None,
                   min_count: int = MIN_COUNT, min_per_class: int = MIN_PER_CLASS) -> dict[str, dict[str, Any]]:
    """The ``subgroups`` entry of each init's aggregate for one (task, protocol, fraction).

    attributes: name -> ``[N_test]`` values (str, None where unknown), e.g. {"sex": [...]}.
    test_scores / val_scores: init -> seed -> ``[N, C]`` probabilities; the operating point of
    each (init, seed) is chosen on its validation scores. reference: the SSL init; every other
    init gets ``gap_vs_ssl`` per attribute. Schema: docs/results_schema.md.
    """
    n_cols = next(iter(next(iter(test_scores.values())).values())).shape[1]
    groups = {a: attribute_values(v) for a, v in attributes.items()}
    for a, g in groups.items():
        if len(g) != len(test_labels):
            raise ValueError(f"subgroups: {a}: {len(g)} values for {len(test_labels)} test images")
    counts = {a: estimability(test_labels, task, n_cols, g, resampling, min_count, min_per_class)
              for a, g in groups.items()}
    estimable = {a: [n for n, e in c.items() if e["status"] == "ok"] for a, c in counts.items()}
    masks = {f"{a}={n}": groups[a] == n for a in groups for n in estimable[a]}
    thresholds = {i: {s: choose_thresholds(val_labels, val_scores[i][s], task) for s in test_scores[i]}
                  for i in test_scores}

    def point(i: str, s: int) -> dict[str, float]:
        out = {}
        for a, values in groups.items():
            if estimable[a]:
                pts = _group_points(test_labels, test_scores[i][s], task, thresholds[i][s], values, estimable[a])
                out.update({f"{a}={n}/{k}": v for n, d in pts.items() for k, v in d.items()})
        return out

    def replicate(i: str, s: int, weights: np.ndarray) -> dict[str, np.ndarray]:
        return _group_replicates(test_labels, test_scores[i][s], task, thresholds[i][s], masks, weights)

    per_init = (bootstrap_seeds(test_scores, point, replicate, resampling.weights, n_boot, confidence, seed)[0]
                if masks else {})
    out: dict[str, dict[str, Any]] = {}
    gap_reps: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for i, by_seed in test_scores.items():
        summ = per_init.get(i)
        entry: dict[str, Any] = {
            "threshold": {"per_seed": {str(s): thresholds[i][s].as_json() for s in sorted(by_seed)}},
            "min_count": min_count, "min_per_class": min_per_class,
            "resampling": resampling.unit, "n_units": resampling.n_units, "n_seeds": len(by_seed),
            "n_effective_seeds": summ.n_effective_seeds if summ else None, "attributes": {}}
        gap_reps[i] = {}
        for a, values in groups.items():
            block, reps = _attribute_block(a, values, counts[a], estimable[a], summ, confidence)
            entry["attributes"][a] = block
            if reps is not None:
                gap_reps[i][a] = reps
        out[i] = entry
    if reference in out:
        for i, entry in out.items():
            for a, block in entry["attributes"].items():
                if i != reference and a in gap_reps[reference] and a in gap_reps[i]:
                    block["gap_vs_ssl"] = _gap_comparison(reference, out[reference]["attributes"][a]["gap"],
                                                          block["gap"], gap_reps[reference][a], gap_reps[i][a],
                                                          confidence)
    return out


def _attribute_block(attribute: str, values: np.ndarray, counts: dict[str, dict], names: list[str],
                     summ: Any, confidence: float) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """One attribute's JSON block of one init, and its gap replicates per metric (None when
    the gap is not estimable)."""
    block: dict[str, Any] = {"n_missing": int(sum(v is None for v in values)), "groups": {}}
    for n, c in counts.items():
        g = dict(c)
        if c["status"] == "ok":
            g.update({k: summary_json(summ.metrics[f"{attribute}={n}/{k}"], 0, 1) for k in METRICS})
        block["groups"][n] = g
    if not names:
        reason = "no estimable group"
        block["worst"] = {"status": NOT_ESTIMABLE, "reason": reason}
        block["gap"] = {"status": NOT_ESTIMABLE, "reason": reason}
        return block, None
    points = {k: s.mean for k, s in summ.metrics.items()}
    worst: dict[str, Any] = {"status": "ok"}
    gap: dict[str, Any] = {"status": "ok"}
    reps = {}
    for k in METRICS:
        w, g, reps[k] = _extremes(points, summ.replicates, [f"{attribute}={n}" for n in names], k, confidence)
        worst[k] = {**w, "group": w["group"].split("=", 1)[1]}
        gap[k] = {kk: (v.split("=", 1)[1] if kk.endswith("_group") else v) for kk, v in g.items()}
    block["worst"] = worst
    if len(names) < 2:
        block["gap"] = {"status": NOT_ESTIMABLE, "reason": f"one estimable group only ({names[0]})"}
        return block, None
    block["gap"] = gap
    return block, reps


def _gap_comparison(reference: str, ref_gap: dict, gap: dict, ref_reps: dict[str, np.ndarray],
                    reps: dict[str, np.ndarray], confidence: float) -> dict[str, Any]:
    """``gap_vs_ssl``: reference gap - this init's gap per metric, replicate by replicate."""
    comp: dict[str, Any] = {"reference": reference}
    for k in METRICS:
        a, b = ref_gap[k].get("mean"), gap[k].get("mean")
        s = _interval(np.nan if a is None or b is None else a - b, ref_reps[k] - reps[k], confidence)
        comp[k] = {**summary_json(s), "verdict": difference_verdict(s, "SSL narrows the gap", "SSL widens the gap")}
    return comp
