"""Means over seeds with bootstrap confidence intervals, and paired differences between inits.

What one replicate resamples, and why:

- Test units, with replacement: PATIENTS where the task knows them (shard tasks;
  ``Split.patients``), images only where it does not (MedMNIST ships no patient ids). A
  patient's images share anatomy, scanner and label, so their scores are correlated; treating
  them as independent draws made the intervals 0.5-0.7x too narrow (on pure-noise labels,
  600 patients x 4 images, about 30% of cells excluded chance against 5% nominal). The cluster
  bootstrap draws ``U`` patients with replacement (``U`` = test patients) and gives every image
  of a patient that patient's draw count as its weight; the draws depend only on ``U`` and the
  seed, so a task whose patients each carry k identical images gets exactly the interval of one
  image per patient. One weight vector is shared by every init and seed in the replicate.
- Effective seeds, with replacement. With three seeds, resampling seed means alone gives an
  interval from three numbers, which is no interval at all; so each replicate recomputes every
  cell's metric on the reweighted test set and averages over the drawn seeds. Only genuinely
  distinct seed results are resampled: seeds whose test predictions are identical (kNN or the
  linear probe on ImageNet or SSL features at label fraction 1.0, where the seed changes
  nothing) count as ONE effective seed, for the mean and for the interval, and the aggregates
  say so. Random weights are drawn per seed (finetune/runner.py), so they do vary.

The interval thus covers test-population sampling and the seed variation (label subset,
training, random weights) that really occurred. Differences between two inits use the same
test draws for both and resample seeds as pairs (reference seed s with other seed s; distinct
pairs only), which is what makes a small but consistent gain visible.
``tests/finetune/test_coverage.py`` checks by simulation that on noise labels with clustered
patients the intervals exclude chance in about 5% of cells, and that image resampling would not.

Why a hand-written AUC here: sklearn's ``roc_auc_score`` per replicate costs ~1-2 ms per
class, i.e. minutes per table cell at 1,000 replicates on the larger MedMNIST test sets. The
weighted Mann-Whitney statistic below computes all replicates of one score column from a
single sort; ``tests/finetune/test_metrics.py`` checks it equals ``roc_auc_score`` on resamples.
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


@dataclass
class Resampling:
    """The unit the bootstrap draws: ``unit`` "patients" or "images", ``n_units`` of them, and
    ``unit_of`` ``[N]`` int (the unit index of each test image, 0..n_units-1)."""

    unit: str
    n_units: int
    unit_of: np.ndarray

    @classmethod
    def of(cls, n_images: int, patients: np.ndarray | None) -> Resampling:
        """Patients where ids are known (``[N]`` pseudonyms), else images."""
        if patients is None:
            return cls("images", n_images, np.arange(n_images))
        if len(patients) != n_images:
            raise ValueError(f"{len(patients)} patient ids for {n_images} test images")
        names, unit_of = np.unique(np.asarray(patients), return_inverse=True)
        return cls("patients", len(names), unit_of.reshape(-1))

    def weights(self, rng: np.random.Generator, b: int) -> np.ndarray:
        """``[b, N]`` float image weights of ``b`` replicates: each replicate draws n_units units
        with replacement, and an image weighs its unit's draw count. Only ``n_units`` and the rng
        decide the draws (so k identical images per patient = one image per patient)."""
        u = self.n_units
        draws = rng.integers(0, u, size=(b, u))
        # One bincount over offset rows is the per-row bincount, without a Python loop.
        counts = np.bincount((draws + u * np.arange(b)[:, None]).ravel(), minlength=b * u).reshape(b, u)
        return counts[:, self.unit_of].astype(np.float64)


def effective_seeds(scores: dict[int, np.ndarray]) -> dict[int, int]:
    """seed -> its effective seed: the smallest seed whose test predictions are identical.

    A deterministic protocol gives the same predictions for every seed: kNN, and the linear
    probe (lbfgs ignores its random_state), on ImageNet or SSL features at fraction 1.0, where
    no label subset is drawn. Counting them as several seeds would claim seed variation that
    never happened. Exact equality: different runs that merely agree closely
    are different results.
    """
    reps: list[int] = []
    out: dict[int, int] = {}
    for s in sorted(scores):
        match = next((r for r in reps if scores[r].shape == scores[s].shape
                      and np.array_equal(scores[r], scores[s])), None)
        if match is None:
            reps.append(s)
            match = s
        out[s] = match
    return out


def bootstrap_group(labels: np.ndarray, task: str, cells: dict[str, dict[int, np.ndarray]],
                    points: dict[str, dict[int, tuple[float, float]]], reference: str | None,
                    n_boot: int, confidence: float, seed: int = 0, chunk: int = 100,
                    resampling: Resampling | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Summaries for one (task, protocol, fraction) over inits.

    labels: test labels ``[N, L]``; cells: init -> seed -> test scores; points: init -> seed ->
    (auc, acc) from medmnist's functions; resampling: the test units (default: images).
    Returns ``(per_init, diffs)``: per_init[init] = {"auc": Summary, "acc": Summary, "n_seeds",
    "n_effective_seeds"}, the mean over effective seeds; diffs[init] = the same for
    ``reference - init`` over their common seeds, resampled as distinct (reference, init) pairs.
    """
    resampling = resampling or Resampling.of(len(labels), None)
    inits = list(cells)
    rng = np.random.default_rng(seed)
    eff = {i: effective_seeds(cells[i]) for i in inits}
    reps_of = {i: sorted(set(eff[i].values())) for i in inits}
    auc_reps = {i: {s: [] for s in reps_of[i]} for i in inits}
    acc_reps = {i: {s: [] for s in reps_of[i]} for i in inits}
    for start in range(0, n_boot, chunk):
        weights = resampling.weights(rng, min(chunk, n_boot - start))
        for i in inits:
            for s in reps_of[i]:
                auc, acc = replicate_metrics(labels, cells[i][s], task, weights)
                auc_reps[i][s].append(auc)
                acc_reps[i][s].append(acc)
    reps = {"auc": {i: {s: np.concatenate(v) for s, v in d.items()} for i, d in auc_reps.items()},
            "acc": {i: {s: np.concatenate(v) for s, v in d.items()} for i, d in acc_reps.items()}}

    def resample_mean(stack: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """stack ``[S, B]`` per effective seed; draw ``[B, S]`` seed draws -> ``[B]`` means."""
        return stack[draw, np.arange(n_boot)[:, None]].mean(axis=1)

    per_init: dict[str, dict] = {}
    for i in inits:
        seeds = reps_of[i]
        draw = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
        out = {"n_seeds": len(cells[i]), "n_effective_seeds": len(seeds)}
        for key, k in (("auc", 0), ("acc", 1)):
            point = float(np.mean([points[i][s][k] for s in seeds]))
            stack = np.stack([reps[key][i][s] for s in seeds])
            out[key] = _interval(point, resample_mean(stack, draw), confidence)
        per_init[i] = out
    diffs: dict[str, dict] = {}
    if reference in cells:
        for i in inits:
            if i == reference:
                continue
            common = sorted(set(cells[reference]) & set(cells[i]))
            if not common:
                continue
            # Pairs stay paired: reference seed s against init seed s, each distinct pair once.
            pairs = sorted({(eff[reference][s], eff[i][s]) for s in common})
            draw = rng.integers(0, len(pairs), size=(n_boot, len(pairs)))
            out = {"n_seeds": len(common), "n_effective_seeds": len(pairs)}
            for key, k in (("auc", 0), ("acc", 1)):
                point = float(np.mean([points[reference][r][k] - points[i][o][k] for r, o in pairs]))
                stack = np.stack([reps[key][reference][r] - reps[key][i][o] for r, o in pairs])
                out[key] = _interval(point, resample_mean(stack, draw), confidence)
            diffs[i] = out
    return per_init, diffs
