"""Expected calibration error, before and after temperature scaling, with bootstrap intervals.

What is calibrated, per task type (score layout as medmnist's, see finetune/metrics.py):

- binary and multi-class (and ordinal-regression, scored as multi-class): TOP-LABEL
  calibration (Guo et al. 2017). Binary reads the last column ``p``: the prediction is
  ``p > 0.5`` (getACC's threshold), its confidence ``max(p, 1 - p)``; multi-class predicts the
  argmax, with the max probability as confidence. The outcome is 1 where the prediction is
  right, so the accuracy of a bin is the ACC of its samples.
- multi-label: PER-LABEL calibration of each label's probability of presence against its 0/1
  truth (what torchmetrics' BinaryCalibrationError measures), and the macro mean over labels.
  Folding a rare label's 0.02 into a top-label confidence of 0.98 would hide in which direction
  it is wrong; the per-label form keeps predicted against observed prevalence.

ECE = sum over bins of |sum of outcomes - sum of confidences| / N, i.e. the count-weighted
mean |accuracy - confidence|. Two binnings of 15 bins each:

- ``width``: equal-width bins [0, 1/15), ..., [14/15, 1]; the last bin is CLOSED, so a
  confidence of exactly 1.0 (a saturated softmax) lands in it. torchmetrics' bucketize puts
  1.0 in a 16th bin of its own, which changes the ECE whenever a confidence is exactly 1.0;
  that is why the binning is written here (tests/finetune/test_calibration.py checks it equals
  torchmetrics wherever no confidence is exactly 1.0, and a hand computation where one is).
- ``mass``: equal-mass bins: the inner edges are the k/15 quantiles of the observed
  confidences, so each bin holds about N/15 samples; tied confidences share a bin (a saturated
  model's many 1.0s all go to the last, leaving some bins empty rather than splitting ties).

Temperature scaling (Guo et al.): kNN and the linear probe give probabilities, not logits, so
every protocol is treated alike and ``log p`` serves as the logits (clipped at 1e-7 so that a
probability of exactly 0 or 1 stays finite): multi-class ``softmax(log p / T)``, binary and
each multi-label label ``sigmoid(logit(p) / T)``. T is fitted on the VALIDATION split only, by
minimising the negative log-likelihood over 1/T in [0.01, 100] (the NLL is convex in 1/T, so the
bounded scalar search finds its minimum). Multi-label fits one temperature PER LABEL by default:
labels differ in prevalence and each is its own sigmoid output. A label (or, for binary, the
task) whose validation split holds one class only keeps T = 1, recorded as not fitted. Written
by hand rather than with netcal: it is one convex scalar fit, and netcal would add a dependency
for it.

Intervals: the same construction as the AUC's (finetune/seed_bootstrap.py): patients resampled
where the task records them, effective seeds resampled, paired differences on shared draws, and
percentile intervals; the bins of each sample are held fixed across replicates. The plug-in ECE
is biased upward (noise alone makes bins miss the diagonal: perfectly calibrated scores on 3,000
samples give ~0.02), and a resample carries that bias once more, so for a well-calibrated model
the interval can lie above the point. Hence each ECE also states its NOISE FLOOR (consistency
resampling, Broecker & Smith 2007): the ECE that perfectly calibrated predictions with the same
confidences would show at this test size, outcomes drawn as Bernoulli(confidence) (per bin, by
a normal of the exact variance). An ECE at or
below the floor's 95th percentile is "within the noise floor": no miscalibration is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax

from finetune.seed_bootstrap import bootstrap_seeds, difference_verdict, summary_json
from finetune.stats import Resampling, effective_seeds

N_BINS = 15
BINNINGS = ("width", "mass")
MULTILABEL = "multi-label, binary-class"
#: Probabilities are clipped to [EPS, 1 - EPS] before taking logs.
EPS = 1e-7
#: Search range of the inverse temperature 1/T.
BETA_RANGE = (0.01, 100.0)
#: Draws of the noise floor.
FLOOR_DRAWS = 1000


def calibration_targets(labels: np.ndarray, scores: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence [N, K], outcome [N, K])`` float: K = 1 (top-label) or L (per-label)."""
    y = labels.reshape(len(labels), -1)
    # kNN's vote fractions can leave [0, 1] by a rounding error (1 + 2e-16); a confidence
    # above 1 would give a negative Bernoulli variance in the noise floor.
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    if task == MULTILABEL:
        return scores, (y > 0).astype(np.float64)
    if task == "binary-class":
        p = scores[:, -1] if scores.ndim == 2 else scores
        pred = p > 0.5
        conf = np.where(pred, p, 1 - p)
        return conf[:, None], (pred == (y[:, 0] > 0)).astype(np.float64)[:, None]
    pred = np.argmax(scores, axis=1)
    return scores.max(axis=1)[:, None], (pred == y[:, 0]).astype(np.float64)[:, None]


def bin_edges(conf: np.ndarray, n_bins: int = N_BINS, binning: str = "width") -> np.ndarray:
    """The ``n_bins - 1`` inner bin edges: k / n_bins (``width``), or the k / n_bins quantiles
    of ``conf`` ``[N]`` (``mass``, numpy's default linear interpolation)."""
    k = np.arange(1, n_bins) / n_bins
    if binning == "width":
        return k
    if binning != "mass":
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    return np.quantile(conf, k)


def bin_index(conf: np.ndarray, n_bins: int = N_BINS, binning: str = "width") -> np.ndarray:
    """``[N]`` int bin of each confidence: the number of inner edges at or below it, so a value
    on an edge goes to the bin above, ties share a bin, and 1.0 lands in the last bin."""
    return np.searchsorted(bin_edges(conf, n_bins, binning), conf, side="right")


class BinnedColumns:
    """ECE of J (confidence, outcome) columns under many rows of weights at once.

    The bins of each column are those of the observed sample, held fixed across replicates
    (for ``mass`` the bootstrap re-weighs the equal-mass bins rather than re-cutting them).
    Per bin only the weighted sum of (outcome - confidence) matters: ECE = sum over bins of
    |sum w (y - c)| / sum w. With one nonzero per sample and column, a sparse ``[N, J * bins]``
    matrix turns every replicate and column into one sparse-dense product (15x less work than
    a dense one-hot product; a ChestMNIST cell's 56 columns x 1,000 replicates take ~1 s).
    """

    def __init__(self, columns: list[tuple[np.ndarray, np.ndarray, str]], n_bins: int = N_BINS):
        from scipy.sparse import csr_matrix

        n = len(columns[0][0])
        self.n_cols, self.n_bins = len(columns), n_bins
        rows = np.tile(np.arange(n), len(columns))
        cols = np.concatenate([j * n_bins + bin_index(c, n_bins, b) for j, (c, _, b) in enumerate(columns)])
        vals = np.concatenate([o - c for c, o, _ in columns])
        # Transposed once here: csr [J * bins, N] @ dense [N, B] is the fast direction.
        self.t = csr_matrix((vals, (cols, rows)), shape=(len(columns) * n_bins, n)).tocsr()

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """weights ``[B, N]`` -> ``[B, J]`` ECEs (NaN for a replicate of zero total weight)."""
        r = np.abs(self.t @ weights.T).reshape(self.n_cols, self.n_bins, -1).sum(axis=1).T
        total = weights.sum(axis=1)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, r / np.where(total > 0, total, 1), np.nan)


def ece_replicates(conf: np.ndarray, outcome: np.ndarray, weights: np.ndarray, n_bins: int = N_BINS,
                   binning: str = "width") -> np.ndarray:
    """ECE of one column under each row of ``weights``: conf, outcome ``[N]``; weights ``[B, N]``
    -> ``[B]`` (NaN for a replicate of zero total weight)."""
    return BinnedColumns([(conf, outcome, binning)], n_bins)(weights)[:, 0]


def noise_floor_draws(conf: np.ndarray, rng: np.random.Generator, n_bins: int = N_BINS,
                      binning: str = "width", n_draws: int = FLOOR_DRAWS) -> np.ndarray:
    """``[n_draws]`` ECEs of one column whose outcomes are drawn as Bernoulli(conf): what a
    perfectly calibrated model with these confidences ``[N]`` shows at this sample size.

    A bin's sum of (outcome - confidence) then has mean 0 and variance sum c (1 - c); it is
    drawn as a normal of that variance (per bin, not per sample: 1,000 draws cost nothing even
    for 22,000 samples x 14 labels; the approximation is close once a bin holds a few dozen).
    """
    idx = bin_index(conf, n_bins, binning)
    var = np.bincount(idx, weights=conf * (1 - conf), minlength=n_bins)
    return np.abs(rng.normal(size=(n_draws, n_bins)) * np.sqrt(var)).sum(axis=1) / len(conf)


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, task: str, n_bins: int = N_BINS,
                               binning: str = "width") -> tuple[float, list[float] | None]:
    """``(ece, per_label)``: top-label ECE and None, or for multi-label the macro mean of the
    per-label ECEs and the list of them (label order of the score columns)."""
    conf, outcome = calibration_targets(labels, scores, task)
    ones = np.ones((1, len(conf)))
    per = [float(ece_replicates(conf[:, k], outcome[:, k], ones, n_bins, binning)[0])
           for k in range(conf.shape[1])]
    if task == MULTILABEL:
        return float(np.mean(per)), per
    return per[0], None


def reliability_bins(labels: np.ndarray, scores: np.ndarray, task: str, n_bins: int = N_BINS,
                     binning: str = "width") -> dict[str, list]:
    """Reliability-diagram data: per bin ``confidence`` (mean), ``accuracy`` (mean outcome; for
    multi-label the observed frequency of the label), ``count`` (samples; for multi-label
    sample-label pairs, all labels pooled), and the bin's ``lo``/``hi`` confidence limits (for
    ``mass``, the smallest and largest confidence in it). Empty bins hold None."""
    conf, outcome = calibration_targets(labels, scores, task)
    c, o = conf.ravel(), outcome.ravel()
    idx = bin_index(c, n_bins, binning)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    csum = np.bincount(idx, weights=c, minlength=n_bins)
    osum = np.bincount(idx, weights=o, minlength=n_bins)
    if binning == "width":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        lo, hi = edges[:-1], edges[1:]
    else:
        lo = np.array([c[idx == k].min() if count[k] else np.nan for k in range(n_bins)])
        hi = np.array([c[idx == k].max() if count[k] else np.nan for k in range(n_bins)])

    def col(v: np.ndarray) -> list[float | None]:
        return [float(x) if np.isfinite(x) else None for x in v]

    with np.errstate(invalid="ignore", divide="ignore"):
        return {"confidence": col(csum / count), "accuracy": col(osum / count),
                "count": [int(x) for x in count], "lo": col(lo), "hi": col(hi)}


# --- temperature scaling -------------------------------------------------------------------


@dataclass
class Temperature:
    """Fitted temperatures: ``values`` ``[1]`` (binary, multi-class, or multi-label shared) or
    ``[L]`` (multi-label per label); ``fitted`` False where validation had one class (T = 1).
    T lies in [0.01, 100]; T at 100 means validation preferred near-uniform probabilities (the
    scores carried no usable information)."""

    values: np.ndarray
    fitted: np.ndarray

    def as_json(self) -> dict[str, list]:
        return {"values": [float(v) for v in self.values], "fitted": [bool(f) for f in self.fitted]}


def _logits(scores: np.ndarray, task: str) -> np.ndarray:
    """Logits the temperature divides: log p (multi-class, ``[N, C]``), else logit p of the last
    column (binary, ``[N, 1]``) or of every label (multi-label, ``[N, L]``)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), EPS, 1 - EPS)
    if task == MULTILABEL:
        return np.log(p) - np.log1p(-p)
    if task == "binary-class":
        last = p[:, -1:] if p.ndim == 2 else p[:, None]
        return np.log(last) - np.log1p(-last)
    return np.log(p)


def _nll_sigmoid(z: np.ndarray, y: np.ndarray, beta: float) -> float:
    # -log sigmoid(x) = logaddexp(0, -x): stable for large |x|.
    x = beta * z
    return float(np.mean(np.where(y > 0, np.logaddexp(0, -x), np.logaddexp(0, x))))


def _fit_beta(nll) -> float:
    res = minimize_scalar(nll, bounds=BETA_RANGE, method="bounded", options={"xatol": 1e-5})
    return float(res.x)


def fit_temperature(labels: np.ndarray, scores: np.ndarray, task: str, per_label: bool = True) -> Temperature:
    """Temperature(s) minimising the NLL of ``scores`` (VALIDATION split only) against ``labels``.

    labels ``[N, 1]`` or ``[N, L]``; scores ``[N, C]`` probabilities. per_label: multi-label only,
    one T per label (default) or one shared by all labels.
    """
    y = labels.reshape(len(labels), -1)
    z = _logits(scores, task)
    if task == MULTILABEL:
        yy = (y > 0).astype(np.float64)
        if not per_label:
            ok = bool(np.any(yy > 0) and np.any(yy == 0))
            t = 1 / _fit_beta(lambda b: _nll_sigmoid(z, yy, b)) if ok else 1.0
            return Temperature(np.array([t]), np.array([ok]))
        values, fitted = [], []
        for k in range(z.shape[1]):
            ok = bool(np.any(yy[:, k] > 0) and np.any(yy[:, k] == 0))
            values.append(1 / _fit_beta(lambda b, k=k: _nll_sigmoid(z[:, k], yy[:, k], b)) if ok else 1.0)
            fitted.append(ok)
        return Temperature(np.array(values), np.array(fitted))
    if task == "binary-class":
        yy = (y[:, :1] > 0).astype(np.float64)
        ok = bool(np.any(yy > 0) and np.any(yy == 0))
        t = 1 / _fit_beta(lambda b: _nll_sigmoid(z, yy, b)) if ok else 1.0
        return Temperature(np.array([t]), np.array([ok]))
    cls = y[:, 0].astype(np.int64)
    ok = len(np.unique(cls)) > 1
    rows = np.arange(len(cls))
    t = 1 / _fit_beta(lambda b: float(-np.mean(log_softmax(b * z, axis=1)[rows, cls]))) if ok else 1.0
    return Temperature(np.array([t]), np.array([ok]))


def apply_temperature(scores: np.ndarray, task: str, temperature: Temperature) -> np.ndarray:
    """``scores`` rescaled by the temperature, in the same layout (binary ``[N, 2]`` stays
    ``[1 - p, p]``; a one-column binary layout stays one column)."""
    z = _logits(scores, task)
    t = temperature.values
    if task == MULTILABEL:
        return expit(z / t[None, :])
    if task == "binary-class":
        p = expit(z[:, 0] / t[0])
        return np.c_[1 - p, p] if scores.ndim == 2 and scores.shape[1] == 2 else p.reshape(scores.shape)
    return softmax(z / t[0], axis=1)


# --- one cell group: every init and seed of a (task, protocol, fraction) ----------------------


def calibration_group(task: str, test_labels: np.ndarray, val_labels: np.ndarray,
                      test_scores: dict[str, dict[int, np.ndarray]],
                      val_scores: dict[str, dict[int, np.ndarray]], resampling: Resampling,
                      n_boot: int, confidence: float, seed: int = 0, reference: str | None = None,
                      n_bins: int = N_BINS, per_label_temperature: bool = True) -> dict[str, dict[str, Any]]:
    """The ``calibration`` entry of each init's aggregate for one (task, protocol, fraction).

    test_scores / val_scores: init -> seed -> ``[N_test, C]`` / ``[N_val, C]`` probabilities of
    the same model (the temperature is fitted on its validation scores). resampling: the test
    units (finetune/report.resampling_of). reference: the init others are compared with (the
    SSL init); each other init gets ``diff_vs_ssl`` = reference - init for every ECE.
    Schema: docs/results_schema.md.
    """
    temps = {i: {s: fit_temperature(val_labels, val_scores[i][s], task, per_label_temperature)
                 for s in test_scores[i]} for i in test_scores}
    targets: dict[str, dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]] = {}
    for i, by_seed in test_scores.items():
        targets[i] = {}
        for s, sc in by_seed.items():
            after = apply_temperature(sc, task, temps[i][s])
            targets[i][s] = {"before": calibration_targets(test_labels, sc, task),
                             "after": calibration_targets(test_labels, after, task)}
    n_cols = next(iter(next(iter(targets.values())).values()))["before"][0].shape[1]
    names = [(stage, binning) for stage in ("before", "after") for binning in BINNINGS]
    binned = {i: {s: BinnedColumns([(t[stage][0][:, k], t[stage][1][:, k], binning)
                                    for stage, binning in names for k in range(n_cols)], n_bins)
                  for s, t in by_seed.items()} for i, by_seed in targets.items()}

    def metrics(i: str, s: int, weights: np.ndarray) -> dict[str, np.ndarray]:
        ece = binned[i][s](weights).reshape(len(weights), len(names), n_cols)
        out = {}
        for j, (stage, binning) in enumerate(names):
            out[f"{stage}/{binning}"] = ece[:, j].mean(axis=1)
            if task == MULTILABEL:
                for k in range(n_cols):
                    out[f"{stage}/{binning}/{k}"] = ece[:, j, k]
        return out

    ones = np.ones((1, len(test_labels)))
    pairs = [(reference, i) for i in test_scores if reference in test_scores and i != reference]
    per_init, diffs = bootstrap_seeds(
        test_scores, point=lambda i, s: {k: float(v[0]) for k, v in metrics(i, s, ones).items()},
        replicate=metrics, draw=resampling.weights, n_boot=n_boot, confidence=confidence, seed=seed,
        pairs=pairs)

    out: dict[str, dict[str, Any]] = {}
    rng = np.random.default_rng(seed)
    for i, summ in per_init.items():
        m = summ.metrics
        seeds = sorted(set(effective_seeds(test_scores[i]).values()))
        ece: dict[str, dict[str, dict]] = {}
        for b in BINNINGS:
            ece[b] = {}
            for st in ("before", "after"):
                # Mean over effective seeds and (multi-label) labels, as the ECE itself.
                draws = np.mean([[noise_floor_draws(targets[i][s][st][0][:, k], rng, n_bins, b)
                                  for k in range(n_cols)] for s in seeds], axis=(0, 1))
                e = summary_json(m[f"{st}/{b}"], 0, 1)
                e["floor"] = {"mean": float(draws.mean()), "q95": float(np.quantile(draws, 0.95))}
                e["verdict"] = ("within the noise floor" if e["mean"] is not None
                                and e["mean"] <= e["floor"]["q95"] else "above the noise floor")
                ece[b][st] = e
        entry: dict[str, Any] = {
            "kind": "per-label" if task == MULTILABEL else "top-label", "n_bins": n_bins,
            "ece": ece,
            "temperature": {"fitted_on": "val",
                            "scope": ("per-label" if per_label_temperature else "shared") if task == MULTILABEL
                            else "shared",
                            "per_seed": {str(s): temps[i][s].as_json() for s in sorted(test_scores[i])}},
            "reliability": _pooled_reliability(test_labels, task, test_scores[i], temps[i], n_bins),
            "n_seeds": summ.n_seeds, "n_effective_seeds": summ.n_effective_seeds,
            "resampling": resampling.unit, "n_units": resampling.n_units,
        }
        if task == MULTILABEL:
            entry["per_label"] = {b: {st: [summary_json(m[f"{st}/{b}/{k}"], 0, 1) for k in range(n_cols)]
                                      for st in ("before", "after")} for b in BINNINGS}
        d = diffs.get((reference, i)) if reference else None
        if d is not None:
            entry["diff_vs_ssl"] = {
                "reference": reference, "n_effective_seeds": d.n_effective_seeds,
                **{b: {st: {**summary_json(d.metrics[f"{st}/{b}"]),
                            "verdict": difference_verdict(d.metrics[f"{st}/{b}"], "SSL better calibrated",
                                                          "SSL worse calibrated")}
                       for st in ("before", "after")} for b in BINNINGS}}
        out[i] = entry
    return out


def _pooled_reliability(labels: np.ndarray, task: str, by_seed: dict[int, np.ndarray],
                        temps: dict[int, Temperature], n_bins: int) -> dict[str, dict[str, dict]]:
    """Reliability data of one init, its effective seeds pooled (each distinct result once):
    ``{"before"|"after": {"width"|"mass": reliability_bins(...)}}``."""
    seeds = sorted(set(effective_seeds(by_seed).values()))
    y = np.concatenate([labels] * len(seeds))
    stages = {"before": np.concatenate([by_seed[s] for s in seeds]),
              "after": np.concatenate([apply_temperature(by_seed[s], task, temps[s]) for s in seeds])}
    return {st: {b: reliability_bins(y, sc, task, n_bins, b) for b in BINNINGS} for st, sc in stages.items()}
