"""kNN on frozen features: cosine similarity, temperature-weighted voting.

This is the SSL kNN monitor of Wu et al. 2018 (InstDisc), as used by DINO and lightly's
``knn_predict``; written out here because lightly's version returns only ranked class ids,
not the per-class scores that AUC needs, and has no multi-label form. Multi-label scores are
the similarity-weighted mean of the neighbours' 0/1 label vectors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finetune.metrics import evaluate


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, k: int,
               temperature: float, n_classes: int, multilabel: bool,
               chunk: int = 1024) -> np.ndarray:
    """Scores ``[Q, n_classes]`` (rows sum to 1 unless multi-label) for query features ``[Q, D]``
    from train features ``[N, D]`` with labels ``[N, 1]`` (or ``[N, L]`` multi-label)."""
    bank = F.normalize(torch.from_numpy(train_x).float(), dim=1)
    if multilabel:
        targets = torch.from_numpy(train_y).float()
    else:
        targets = F.one_hot(torch.from_numpy(train_y[:, 0]).long(), n_classes).float()
    k = min(k, len(bank))
    out = []
    for start in range(0, len(query_x), chunk):
        q = F.normalize(torch.from_numpy(query_x[start:start + chunk]).float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        w = (sim / temperature).exp()
        votes = (w.unsqueeze(-1) * targets[idx]).sum(dim=1)
        out.append(votes / w.sum(dim=1, keepdim=True))
    return torch.cat(out).numpy().astype(np.float64)


def run_knn(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], train_idx: np.ndarray,
            task: str, n_classes: int, ks: list[int], temperature: float) -> dict:
    """Pick k on validation AUC, then score test. Returns the test scores, the validation scores
    of the chosen k (what temperatures and thresholds are fitted on) and the chosen k."""
    multilabel = task == "multi-label, binary-class"
    tx, ty = feats["train"][train_idx], labels["train"][train_idx]
    best = None
    for k in ks:
        val = knn_scores(tx, ty, feats["val"], k, temperature, n_classes, multilabel)
        auc, _ = evaluate(labels["val"], val, task)
        if best is None or (np.isfinite(auc) and not auc <= best[0]):
            best = (auc, k, val)
    auc, k, val = best
    test = knn_scores(tx, ty, feats["test"], k, temperature, n_classes, multilabel)
    return {"test_scores": test, "val_scores": val, "chosen": {"k": int(min(k, len(tx)))},
            "val_auc": float(auc)}
