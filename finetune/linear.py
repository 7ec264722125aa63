"""Linear probe on frozen, standardised features: sklearn LogisticRegression, C chosen on val.

Multinomial for binary and multi-class (sklearn's lbfgs default), one-vs-rest for multi-label.
Classes absent from a small training subset get probability 0 in the score matrix, so its
columns always match the task's classes.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from finetune.metrics import evaluate


def _scores(model, x: np.ndarray, n_classes: int, multilabel: bool) -> np.ndarray:
    proba = model.predict_proba(x)
    if multilabel:
        return proba.astype(np.float64)
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_.astype(int)] = proba
    return out


def run_linear(*args, **kwargs) -> dict:
    """See ``_run_linear``; BLAS limited to one thread while it runs.

    lbfgs on a few thousand x 2048 features is a stream of small matrix products: on a busy
    2-core machine multi-threaded OpenBLAS spun ~70x slower (4.4 s vs 0.06 s per fit, measured
    on the demo features); one thread is never slower at this size.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _run_linear(*args, **kwargs)


def _run_linear(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], train_idx: np.ndarray,
               task: str, n_classes: int, Cs: list[float], max_iter: int, seed: int) -> dict:
    """Fit one probe per C on the train subset, keep the best validation AUC, score test.
    Returns test scores, the chosen probe's validation scores, C and its validation AUC."""
    multilabel = task == "multi-label, binary-class"
    scaler = StandardScaler().fit(feats["train"][train_idx])
    tx = scaler.transform(feats["train"][train_idx])
    vx, qx = scaler.transform(feats["val"]), scaler.transform(feats["test"])
    ty = labels["train"][train_idx]
    best = None
    for C in Cs:
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            # Non-convergence at tiny C or few samples is expected; the val AUC judges the fit.
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", UserWarning)  # OvR: a label constant in a subset
            if multilabel:
                model = OneVsRestClassifier(clf).fit(tx, ty)
            elif len(np.unique(ty[:, 0])) < 2:
                return {"error": "the train subset holds a single class"}
            else:
                model = clf.fit(tx, ty[:, 0])
        val = _scores(model, vx, n_classes, multilabel)
        val_auc, _ = evaluate(labels["val"], val, task)
        if best is None or (np.isfinite(val_auc) and not val_auc <= best[0]):
            best = (val_auc, C, model, val)
    val_auc, C, model, val = best
    return {"test_scores": _scores(model, qx, n_classes, multilabel), "val_scores": val,
            "chosen": {"C": C}, "val_auc": float(val_auc)}
