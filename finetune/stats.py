"""Means over seeds with bootstrap confidence intervals, and paired differences between inits.

Why this bootstrap: with three seeds, resampling seed means alone gives an interval from three
numbers, which is no interval at all. Each replicate therefore resamples BOTH the seeds (with
replacement) and the test samples (one multinomial weight vector shared by every init and seed
in the replicate), recomputes each cell's metric on the reweighted test set, and averages over
the drawn seeds. The interval thus covers test-set sampling and seed (label subset and training)
variation. Differences between two inits use the same draws for both (paired), which is what
makes a small but consistent gain visible.

Why a hand-written AUC here: sklearn's ``roc_auc_score`` per replicate costs ~1-2 ms per
class, i.e. minutes per table cell at 1,000 replicates on the larger MedMNIST test sets. The
weighted Mann-Whitney statistic below computes all replicates of one score column from a
single sort; ``tests/finetune/test_stats.py`` checks it equals ``roc_auc_score`` on resamples.
Point estimates never use it: they come from medmnist's own functions (finetune/metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.metrics import binary_columns, per_sample_correct


def weighted_auc(truth: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one binary column under each row of sample weights.

    truth: ``[N]`` bool; score: ``[N]``; weights: ``[B, N]`` non-negative (bootstrap counts).
    Returns ``[B]``; NaN where a replicate has no positive or no negative weight. Ties count
    one half, as in roc_auc_score.
    """
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    t = truth[order]
    w = weights[:, order]
    if np.all(s[1:] != s[:-1]):
        # No ties (the usual case for probabilities): the negative weight below a positive is
        # the running sum at its slot; 4x faster than the grouped form below.
        cneg = np.cumsum(w * ~t, axis=1)
        wpos = w[:, t]
        num = (wpos * cneg[:, t]).sum(axis=1)
        den = wpos.sum(axis=1) * (w.sum(axis=1) - wpos.sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    pos = np.add.reduceat(w * t, starts, axis=1)
    neg = np.add.reduceat(w * ~t, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def replicate_metrics(labels: np.ndarray, scores: np.ndarray, task: str,
                      weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(auc [B], acc [B])`` of one cell's test scores under each weight row."""
    cols = binary_columns(labels, scores, task)
    auc = np.mean([weighted_auc(t, s, weights) for t, s in cols], axis=0)
    correct = per_sample_correct(labels, scores, task)
    acc = weights @ correct / weights.sum(axis=1)
    return auc, acc


@dataclass
class Summary:
    mean: float
    lo: float
    hi: float

    def as_list(self) -> list[float]:
        return [self.lo, self.hi]


def _interval(point: float, reps: np.ndarray, confidence: float) -> Summary:
    reps = reps[np.isfinite(reps)]
    if len(reps) == 0 or not np.isfinite(point):
        return Summary(point, float("nan"), float("nan"))
    a = (1 - confidence) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    return Summary(float(point), float(lo), float(hi))


def bootstrap_group(labels: np.ndarray, task: str, cells: dict[str, dict[int, np.ndarray]],
                    points: dict[str, dict[int, tuple[float, float]]], reference: str | None,
                    n_boot: int, confidence: float, seed: int = 0,
                    chunk: int = 100) -> tuple[dict[str, dict], dict[str, dict]]:
    """Summaries for one (task, protocol, fraction) over inits.

    cells: init -> seed -> test scores; points: init -> seed -> (auc, acc) from medmnist's
    functions. Returns ``(per_init, diffs)``: per_init[init] = {"auc": Summary, "acc": Summary,
    "n_seeds"}; diffs[init] = the same for ``reference - init`` over their common seeds.
    """
    inits = list(cells)
    n = len(labels)
    rng = np.random.default_rng(seed)
    auc_reps = {i: {s: [] for s in cells[i]} for i in inits}
    acc_reps = {i: {s: [] for s in cells[i]} for i in inits}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        # Counts of n draws with replacement (bincount is ~8x faster than rng.multinomial).
        draws = rng.integers(0, n, size=(b, n))
        weights = np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)
        for i in inits:
            for s, scores in cells[i].items():
                auc, acc = replicate_metrics(labels, scores, task, weights)
                auc_reps[i][s].append(auc)
                acc_reps[i][s].append(acc)
    auc_reps = {i: {s: np.concatenate(v) for s, v in d.items()} for i, d in auc_reps.items()}
    acc_reps = {i: {s: np.concatenate(v) for s, v in d.items()} for i, d in acc_reps.items()}

    def combine(init_reps: dict[int, np.ndarray], seeds: list[int], draw: np.ndarray) -> np.ndarray:
        stack = np.stack([init_reps[s] for s in seeds])            # [S, B]
        return stack[draw, np.arange(n_boot)[:, None]].mean(axis=1)  # draw: [B, S]

    per_init: dict[str, dict] = {}
    for i in inits:
        seeds = sorted(cells[i])
        draw = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
        point_auc = float(np.mean([points[i][s][0] for s in seeds]))
        point_acc = float(np.mean([points[i][s][1] for s in seeds]))
        per_init[i] = {
            "auc": _interval(point_auc, combine(auc_reps[i], seeds, draw), confidence),
            "acc": _interval(point_acc, combine(acc_reps[i], seeds, draw), confidence),
            "n_seeds": len(seeds),
        }
    diffs: dict[str, dict] = {}
    if reference in cells:
        for i in inits:
            if i == reference:
                continue
            seeds = sorted(set(cells[reference]) & set(cells[i]))
            if not seeds:
                continue
            draw = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
            out = {"n_seeds": len(seeds)}
            for key, reps, k in (("auc", auc_reps, 0), ("acc", acc_reps, 1)):
                point = float(np.mean([points[reference][s][k] - points[i][s][k] for s in seeds]))
                d = combine(reps[reference], seeds, draw) - combine(reps[i], seeds, draw)
                out[key] = _interval(point, d, confidence)
            diffs[i] = out
    return per_init, diffs
