"""The linear probe as a torch head, so Grad-CAM can run through backbone + probe.

finetune/linear.py scores frozen features with ``StandardScaler`` then sklearn's
``LogisticRegression`` (one-vs-rest for multi-label). Both are affine, so they fold into one
``nn.Linear`` on the raw features: ``W' = W / scale``, ``b' = b - W' @ mean``. Its logits give
sklearn's ``predict_proba`` exactly: softmax for multinomial; for a binary model (sklearn
keeps one coefficient row) the logits ``[0, z]``, whose softmax is ``[1 - s(z), s(z)]``; a
sigmoid per label for one-vs-rest. Task classes the probe never saw get a logit of -1e4
(probability 0, as ``linear._scores`` gives them).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler
from torch import nn

_ABSENT = -1e4


def fit_probe(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int, seed: int,
              multilabel: bool) -> tuple[StandardScaler, object]:
    """The probe linear.py fits for one C: ``features [N, D]``, ``labels [N, 1]`` (or
    ``[N, L]`` 0/1 for multi-label). Returns ``(scaler, model)``."""
    scaler = StandardScaler().fit(features)
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        x = scaler.transform(features)
        model = OneVsRestClassifier(clf).fit(x, labels) if multilabel else clf.fit(x, labels[:, 0])
    return scaler, model


def permuted(labels: np.ndarray, seed: int) -> np.ndarray:
    """Labels shuffled across samples: the data-randomisation test's training target."""
    return labels[np.random.default_rng(seed).permutation(len(labels))]


def probe_head(scaler: StandardScaler, model, n_classes: int) -> nn.Linear:
    """``nn.Linear(D, n_classes)`` whose logits reproduce ``model.predict_proba`` on raw features.

    ``model``: a fitted ``LogisticRegression`` (softmax over ``n_classes`` task classes) or
    ``OneVsRestClassifier`` of them (multi-label: ``n_classes`` labels, sigmoid each).
    """
    mean = np.asarray(scaler.mean_ if scaler.with_mean else 0.0, dtype=np.float64)
    scale = np.asarray(scaler.scale_ if scaler.with_std else 1.0, dtype=np.float64)
    if isinstance(model, OneVsRestClassifier):
        coef = np.concatenate([e.coef_ for e in model.estimators_])
        bias = np.concatenate([e.intercept_ for e in model.estimators_])
        if len(coef) != n_classes:
            raise ValueError(f"one-vs-rest probe has {len(coef)} labels, task has {n_classes}")
        rows = list(range(n_classes))
    else:
        classes = model.classes_.astype(int)
        if len(classes) == 2:  # sklearn's binary form: one row, p(class 1) = s(z)
            coef = np.concatenate([np.zeros_like(model.coef_), model.coef_])
            bias = np.concatenate([[0.0], model.intercept_])
        else:
            coef, bias = model.coef_, model.intercept_
        rows = list(classes)
    d = coef.shape[1]
    weight = np.zeros((n_classes, d))
    full_bias = np.full(n_classes, _ABSENT)
    w = coef / scale
    weight[rows] = w
    full_bias[rows] = bias - w @ (mean * np.ones(d))
    head = nn.Linear(d, n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).float())
        head.bias.copy_(torch.from_numpy(full_bias).float())
    return head


class ProbeClassifier(nn.Module):
    """Frozen backbone + folded probe, with ``.backbone`` and ``.head`` like full.Classifier."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
