"""Frozen features, computed once per (task, init) on every split and cached on disk.

kNN and the linear probe of every fraction and seed read the same cache, so the backbone
runs once per (task, init) however many cells use it. Random weights are the exception: each
seed draws its own network (finetune/runner.py), so their cache is per (task, seed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.tasks import SPLITS, Split, TaskData

log = logging.getLogger(__name__)


@torch.no_grad()
def extract(model: nn.Module, split: Split, prep: Callable[[Split, np.ndarray], torch.Tensor],
            device: torch.device, batch_size: int) -> np.ndarray:
    """Pooled backbone features ``[N, D]`` float32 of a split, in eval mode."""
    model.eval().to(device)
    out = []
    order = np.arange(len(split))
    for start in range(0, len(order), batch_size):
        batch = prep(split, order[start:start + batch_size]).to(device, non_blocking=True)
        out.append(model(batch).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def cached_features(path: Path, model_fn: Callable[[], nn.Module], task: TaskData,
                    prep: Callable[[Split, np.ndarray], torch.Tensor], device: torch.device,
                    batch_size: int) -> dict[str, np.ndarray]:
    """Features of all splits from ``path`` (npz) if present, else computed and saved atomically.

    ``model_fn`` is only called on a cache miss, so a finished (task, init) builds no model.
    """
    if path.is_file():
        with np.load(path) as data:
            feats = {s: data[s] for s in SPLITS}
        if all(len(feats[s]) == len(task.splits[s]) for s in SPLITS):
            return feats
        log.warning("%s does not match the task's split sizes; recomputing", path)
    model = model_fn()
    feats = {}
    for split in SPLITS:
        feats[split] = extract(model, task.splits[split], prep, device, batch_size)
        log.info("features %s/%s: %s", task.name, split, feats[split].shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **feats)
    os.replace(tmp, path)
    return feats
