"""One cell's protocol run: kNN, the linear probe or full fine-tuning, on one training subset.

The runner decides WHICH cells run; this module runs one. A cell trains on ``train_idx`` (rows
of the train split) and selects its hyper-parameters (k, C, the epoch) on validation: the whole
val split for the in-distribution grid, or ``val_idx`` (the other sites' val images) for a
site-shift fold, so the held-out site never takes part in model selection. Every cell scores the
WHOLE test split (a fold's in-distribution and held-out test images are rows of it), and returns
the chosen model's validation scores, on which temperatures and thresholds are fitted.

Frozen features are computed once per (task, init) (per (task, seed) for random weights) and
cached on disk (finetune/features.py); ``FrozenFeatures`` keeps one set in memory at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from finetune.cells import cell_key
from finetune.config import FinetuneRunConfig
from finetune.features import cached_features
from finetune.full import run_finetune
from finetune.knn import run_knn
from finetune.linear import run_linear
from finetune.preprocess import Preprocessor
from finetune.tasks import SPLITS, TaskData
from medssl.init import Init

#: Cell and feature-cache identity of random weights drawn from each cell's own seed. Cells of
#: the earlier meaning (``random:seed<run seed>``: one random network shared by every seed) get
#: other keys, so they are never reused as if they carried seed variation.
RANDOM_PER_SEED = "random:weights-from-cell-seed"


def seed_free(init: Init, protocol: str, fraction: float) -> bool:
    """True where a cell's result cannot depend on its seed: kNN and the linear probe (lbfgs
    ignores ``random_state``) on ImageNet or SSL features at label fraction 1.0 (no subset is
    drawn). The runner computes such a cell once and stores it for every seed; the aggregates
    count the copies as one effective seed (finetune/stats.py), as they would the recomputed
    identical results."""
    return init.kind != "random" and protocol in ("knn", "linear") and fraction >= 1.0


class FrozenFeatures:
    """The cached frozen features of one init: ``get(seed)`` -> split -> ``[N, D]`` float32.

    ImageNet and SSL weights give one feature set per task; random weights one per seed (the
    network is drawn from the cell's seed). The last set read stays in memory.
    """

    def __init__(self, cfg: FinetuneRunConfig, task: TaskData, init: Init, fp: str, common: dict,
                 make: Callable[[], torch.nn.Module], prep: Preprocessor, device: torch.device) -> None:
        self._key = (lambda seed: cell_key(**common, init=RANDOM_PER_SEED, seed=seed)) if init.kind == "random" \
            else (lambda seed: cell_key(**common, init=fp))
        self._random = init.kind == "random"
        self.cfg, self.task, self.make, self.prep, self.device = cfg, task, make, prep, device
        self._loaded: tuple[str, dict[str, np.ndarray]] | None = None

    def get(self, seed: int) -> dict[str, np.ndarray]:
        key = self._key(seed)
        if self._loaded is None or self._loaded[0] != key:
            path = Path(self.cfg.output_dir) / "features" / f"{self.task.name}-{key}.npz"
            weights_seed = seed if self._random else self.cfg.seed
            self._loaded = (key, cached_features(path, partial(_seeded, self.make, weights_seed), self.task,
                                                 self.prep, self.device, self.cfg.feature_batch_size))
        return self._loaded[1]


def run_protocol(protocol: str, cfg: FinetuneRunConfig, task: TaskData, train_idx: np.ndarray,
                 val_idx: np.ndarray | None, seed: int, features: FrozenFeatures,
                 make: Callable[[], torch.nn.Module], prep: Preprocessor, device: torch.device) -> dict:
    """Run one cell. Returns ``{"test_scores" [N_test, C], "val_scores" [N_val or len(val_idx), C],
    "val_auc", "chosen"}``, or ``{"error": reason}`` when the cell cannot be fitted."""
    labels = {s: task.splits[s].labels for s in SPLITS}
    if val_idx is not None:
        labels["val"] = labels["val"][val_idx]
    if protocol in ("knn", "linear"):
        feats = features.get(seed)
        if val_idx is not None:
            feats = {**feats, "val": feats["val"][val_idx]}
        if protocol == "knn":
            return run_knn(feats, labels, train_idx, task.task, task.n_classes, cfg.knn.k, cfg.knn.temperature)
        return run_linear(feats, labels, train_idx, task.task, task.n_classes, cfg.linear.Cs,
                          cfg.linear.max_iter, seed)
    if val_idx is not None:
        task = dataclasses.replace(task, splits={**task.splits, "val": task.splits["val"].subset(val_idx)})
    return run_finetune(make, task, train_idx, prep, cfg.finetune, device, seed, cfg.feature_batch_size)


def _seeded(make: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make()
