"""Label-fraction subsets of the train split: stratified, by patient when ids exist.

The draw depends only on (labels, patients, fraction, seed), so every init and protocol of a
(fraction, seed) trains on the very same subset: the comparison is paired. Validation and test
splits are never subsampled.
"""

from __future__ import annotations

import numpy as np


def strata(labels: np.ndarray) -> np.ndarray:
    """``[N]`` stratum per sample: the class, or for multi-label the first positive label
    (-1 when none), which balances the rare labels at least by their first occurrence."""
    y = labels.reshape(len(labels), -1)
    if y.shape[1] == 1:
        return y[:, 0].astype(np.int64)
    return np.where(y.any(axis=1), np.argmax(y > 0, axis=1), -1).astype(np.int64)


def draw_subset(labels: np.ndarray, fraction: float, seed: int,
                patients: np.ndarray | None = None, multilabel: bool = False) -> np.ndarray:
    """Sorted indices of a stratified ``fraction`` of the train split.

    With ``patients``, whole patients are drawn (a patient's stratum is their most common
    one), so no patient is split between labelled and unlabelled. Each stratum gives
    ``round(fraction * size)`` units, at least one. Afterwards every class (every label for
    multi-label) present in the split gets at least one sample, adding a random unit holding it.
    """
    n = len(labels)
    if fraction >= 1.0:
        return np.arange(n)
    rng = np.random.default_rng([int(seed), round(fraction * 1_000_000)])
    stratum = strata(labels)
    if patients is None:
        units = np.arange(n)
        members = [np.array([i]) for i in range(n)]
        unit_stratum = stratum
    else:
        units_names, inverse = np.unique(patients, return_inverse=True)
        members = [np.flatnonzero(inverse == u) for u in range(len(units_names))]
        unit_stratum = np.array([np.bincount(stratum[m] + 1).argmax() - 1 for m in members])
        units = np.arange(len(members))
    chosen: set[int] = set()
    for value in np.unique(unit_stratum):
        pool = units[unit_stratum == value]
        take = max(1, round(fraction * len(pool)))
        chosen.update(rng.choice(pool, size=min(take, len(pool)), replace=False).tolist())
    # Keep at least one example of each class/label so every classifier sees every class.
    y = labels.reshape(n, -1)
    columns = range(y.shape[1]) if multilabel else np.unique(y[:, 0])
    for c in columns:
        holds = (y[:, c] > 0) if multilabel else (y[:, 0] == c)
        if any(holds[members[u]].any() for u in chosen):
            continue
        candidates = [u for u in units if holds[members[u]].any()]
        if candidates:
            chosen.add(int(rng.choice(candidates)))
    return np.sort(np.concatenate([members[u] for u in sorted(chosen)]))
