"""AUC and ACC exactly as MedMNIST's Evaluator defines them, for every task type.

Point estimates call ``medmnist.evaluator.getAUC`` / ``getACC`` directly, so a number in
results.json is the number medmnist would print for the same predictions. Score layout:
``[N, n_classes]`` probabilities for binary and multi-class (binary uses the last column, as
medmnist does), ``[N, L]`` per-label probabilities for multi-label; labels ``[N, 1]`` or
``[N, L]`` as in medmnist's npz files.
"""

from __future__ import annotations

import numpy as np
from medmnist.evaluator import getACC, getAUC

TASK_TYPES = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression")


def evaluate(labels: np.ndarray, scores: np.ndarray, task: str) -> tuple[float, float]:
    """``(auc, acc)`` of ``scores`` against ``labels`` under medmnist's definitions.

    AUC is NaN (not an exception) when the test labels leave it undefined, e.g. a class with
    no test sample; the report shows such cells as missing instead of stopping the suite.
    """
    if task not in TASK_TYPES:
        raise ValueError(f"unknown task type {task!r}")
    try:
        auc = float(getAUC(labels, scores, task))
    except ValueError:
        auc = float("nan")
    acc = float(getACC(labels, scores, task))
    return auc, acc


def per_sample_correct(labels: np.ndarray, scores: np.ndarray, task: str) -> np.ndarray:
    """``[N]`` float: 1/0 correctness (mean over labels for multi-label), so ACC = its mean.

    Mirrors getACC's thresholds (0.5 for binary and multi-label, argmax otherwise) so that
    bootstrap replicates of ACC are weighted means of this vector.
    """
    y = labels.reshape(len(labels), -1)
    if task == "multi-label, binary-class":
        return ((scores > 0.5) == (y > 0)).mean(axis=1).astype(np.float64)
    if task == "binary-class":
        s = scores[:, -1] if scores.ndim == 2 else scores
        return ((s > 0.5) == (y[:, 0] > 0)).astype(np.float64)
    return (np.argmax(scores, axis=-1) == y[:, 0]).astype(np.float64)


def binary_columns(labels: np.ndarray, scores: np.ndarray, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (truth 0/1, score) columns whose AUCs getAUC averages, for the bootstrap."""
    y = labels.reshape(len(labels), -1)
    if task == "multi-label, binary-class":
        return [(y[:, i] > 0, scores[:, i]) for i in range(scores.shape[1])]
    if task == "binary-class":
        return [(y[:, 0] > 0, scores[:, -1] if scores.ndim == 2 else scores)]
    return [(y[:, 0] == i, scores[:, i]) for i in range(scores.shape[1])]
