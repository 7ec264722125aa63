"""Operating points chosen on validation, and the decisions, sensitivity and specificity they give.

Sensitivity and specificity need a decision, and the decision a threshold. It is chosen on the
VALIDATION split only (a threshold tuned on test would flatter every test figure):

- binary: Youden's J (sensitivity + specificity - 1) maximised over the validation ROC of the
  positive (last) column; a sample is positive when its score is >= the threshold;
- multi-label: the same, per label (``[L]`` thresholds);
- multi-class and ordinal-regression: no threshold; the decision is the argmax, as medmnist's
  ACC takes it. Sensitivity and specificity are then the MACRO means over classes of each
  class's one-vs-rest sensitivity (recall) and specificity of that argmax decision. The
  "positive class" of a multi-class task is not defined, so a macro mean is the only choice that
  does not single one class out.

A validation column holding one class only has no ROC: its threshold falls back to 0.5 (getACC's)
and is recorded as not chosen (``Thresholds.chosen``).

All figures are written in a "decision matrix" form: truth ``[N, K]`` bool and decision
``[N, K]`` bool, with K = 1 (binary), L (multi-label) or C (multi-class, one-hot), so weighted
bootstrap replicates are a pair of matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve

MULTILABEL = "multi-label, binary-class"


@dataclass
class Thresholds:
    """``values``: ``[1]`` (binary) or ``[L]`` (multi-label) score thresholds, None for argmax
    tasks; ``chosen``: False where validation had one class and 0.5 was used."""

    values: np.ndarray | None
    chosen: np.ndarray | None
    rule: str

    def as_json(self) -> dict:
        if self.values is None:
            return {"rule": self.rule, "values": None, "chosen": None}
        return {"rule": self.rule, "values": [float(v) for v in self.values],
                "chosen": [bool(c) for c in self.chosen]}


def _youden(truth: np.ndarray, score: np.ndarray) -> tuple[float, bool]:
    if truth.all() or not truth.any():
        return 0.5, False
    fpr, tpr, thr = roc_curve(truth, score)
    # roc_curve's first threshold is +inf (nothing positive); never pick it.
    j = tpr[1:] - fpr[1:]
    return float(thr[1:][int(np.argmax(j))]), True


def choose_thresholds(val_labels: np.ndarray, val_scores: np.ndarray, task: str) -> Thresholds:
    """Thresholds from the VALIDATION split: labels ``[N, 1]``/``[N, L]``, scores ``[N, C]``."""
    y = val_labels.reshape(len(val_labels), -1)
    if task == MULTILABEL:
        picks = [_youden(y[:, k] > 0, val_scores[:, k]) for k in range(val_scores.shape[1])]
        return Thresholds(np.array([t for t, _ in picks]), np.array([c for _, c in picks]), "youden-val")
    if task == "binary-class":
        s = val_scores[:, -1] if val_scores.ndim == 2 else val_scores
        t, c = _youden(y[:, 0] > 0, s)
        return Thresholds(np.array([t]), np.array([c]), "youden-val")
    return Thresholds(None, None, "argmax")


def decision_matrix(labels: np.ndarray, scores: np.ndarray, task: str,
                    thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(truth [N, K] bool, decision [N, K] bool, correct [N] float)``; ``correct`` is the
    per-sample accuracy (mean over labels for multi-label), so ACC is its mean."""
    y = labels.reshape(len(labels), -1)
    if task == MULTILABEL:
        truth = y > 0
        decision = scores >= thresholds.values[None, :]
        return truth, decision, (truth == decision).mean(axis=1)
    if task == "binary-class":
        s = scores[:, -1] if scores.ndim == 2 else scores
        truth = (y[:, :1] > 0)
        decision = (s >= thresholds.values[0])[:, None]
        return truth, decision, (truth == decision)[:, 0].astype(np.float64)
    n_classes = scores.shape[1]
    truth = y[:, :1] == np.arange(n_classes)[None, :]
    pred = np.argmax(scores, axis=1)
    decision = pred[:, None] == np.arange(n_classes)[None, :]
    return truth, decision, (pred == y[:, 0]).astype(np.float64)


def operating_metrics(truth: np.ndarray, decision: np.ndarray, correct: np.ndarray,
                      weights: np.ndarray) -> dict[str, np.ndarray]:
    """``acc``, ``sensitivity``, ``specificity`` ``[B]`` under weights ``[B, N]`` (macro means
    over the K columns; NaN where a replicate has no positive or no negative weight in a column)."""
    t = truth.astype(np.float64)
    d = decision.astype(np.float64)
    pos = weights @ t
    neg = weights @ (1 - t)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (weights @ (t * d)) / pos
        spec = (weights @ ((1 - t) * (1 - d))) / neg
        acc = weights @ correct / weights.sum(axis=1)
    return {"acc": acc, "sensitivity": sens.mean(axis=1), "specificity": spec.mean(axis=1)}
