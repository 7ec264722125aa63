"""Label-free monitoring: RankMe of the published backbone on a fixed held-out batch.

How to choose a checkpoint without labels: RankMe (Garrido et al. 2023,
https://arxiv.org/abs/2210.02885) is the effective rank of the embeddings of a fixed set of
images, ``exp(-sum p_k log p_k)`` with ``p_k`` the singular values normalised to sum 1; across
checkpoints of one run it tracks downstream accuracy, and it needs no labels. When the val
samples carry labels, a leave-one-out kNN accuracy on the same batch is logged beside it.

The batch is the first ``train.eval_samples`` readable samples of the shards' ``val`` split in
shard order, preprocessed without randomness (window to [0, 1], resize to
``augment.crop_size``, or for volumes ``augment.volume_crop_size``, normalise), so every evaluation of every run sees the same images.
Every rank reads it at start-up, so a missing or unusable val split is the same one-line
ConfigError on every rank before any collective (rank zero alone refusing would leave the
others waiting); only rank zero keeps the images. The evaluation runs on rank zero in eval
mode under ``no_grad`` inside a forked RNG and restores the train mode: no weight, BatchNorm
statistic, RNG state or data position changes, so a resumed run stays bitwise equal to an
uninterrupted one. The other ranks wait for it at a barrier.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
import webdataset as wds
from torch import nn

from medssl.errors import ConfigError, MedsslError
from pretrain.augment import window_to_unit
from pretrain.config import PretrainConfig
from pretrain.data import load_sample, resolve_shards
from pretrain.volumes import crop_size, is_volume, load_size

log = logging.getLogger(__name__)

EVAL_SPLIT = "val"
KNN_K = 20


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of ``[N, D]`` embeddings (Garrido et al. 2023, eq. 1)."""
    s = torch.linalg.svdvals(embeddings.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def knn_accuracy(embeddings: torch.Tensor, labels: torch.Tensor, k: int = KNN_K) -> float:
    """Leave-one-out accuracy of a cosine kNN (majority of the ``k`` nearest others)."""
    z = F.normalize(embeddings.double(), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-math.inf)                       # a sample is not its own neighbour
    k = min(k, len(labels) - 1)
    nearest = sim.topk(k, dim=1).indices
    votes = F.one_hot(labels[nearest], int(labels.max()) + 1).sum(dim=1)
    return float((votes.argmax(dim=1) == labels).double().mean())


class Monitor:
    """The fixed batch and when to evaluate it; ``evaluate(backbone)`` returns the metrics row."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, every: int, max_steps: int):
        self.images, self.labels, self.every, self.max_steps = images, labels, every, max_steps

    @classmethod
    def from_config(cls, cfg: PretrainConfig, keep_images: bool = True) -> Monitor | None:
        """None when ``train.eval_every`` is 0; ConfigError when there is no val split to read.

        ``keep_images=False`` (ranks other than zero): checked the same way, images dropped.
        """
        if not cfg.train.eval_every:
            return None
        try:
            urls = resolve_shards(cfg.data.shards, EVAL_SPLIT)
        except MedsslError as exc:
            raise ConfigError(f"train.eval_every={cfg.train.eval_every} needs a {EVAL_SPLIT} split beside the "
                              f"training shards ({exc}); set train.eval_every=0") from None
        if not urls:
            raise ConfigError(f"train.eval_every={cfg.train.eval_every}: {cfg.data.shards} has no "
                              f"{EVAL_SPLIT} shards; set train.eval_every=0")
        items, labels = [], []
        raws = wds.tarfile_samples(({"url": u} for u in sorted(urls)), handler=wds.warn_and_continue)
        for raw in itertools.islice(raws, 4 * cfg.train.eval_samples):
            try:
                item = load_sample(raw, load_size(cfg), cfg.data.volume_fit)
            except Exception as exc:  # noqa: BLE001  a damaged val sample: named, skipped
                log.warning("eval batch: skipping %s in %s (%s)", raw.get("__key__"), raw.get("__url__"), exc)
                continue
            items.append(item)
            label = json.loads(raw["json"]).get("label")
            labels.append(label if isinstance(label, int) else None)
            if len(items) == cfg.train.eval_samples:
                break
        if len(items) < 2:
            raise ConfigError(f"train.eval_every: fewer than 2 readable {EVAL_SPLIT} samples in {cfg.data.shards}")
        kinds = {bool(i["volume"]) for i in items}
        if kinds != {is_volume(cfg)}:
            raise ConfigError(f"train.eval_every: {EVAL_SPLIT} samples of {cfg.data.shards} are "
                              f"{'volumes' if True in kinds else '2-D images'} but model.arch={cfg.model.arch} is "
                              f"{'3-D' if is_volume(cfg) else '2-D'}")
        channels = {int(i["image"].shape[0]) for i in items}
        if channels != {cfg.model.in_chans}:
            raise ConfigError(f"train.eval_every: {EVAL_SPLIT} samples of {cfg.data.shards} have "
                              f"{sorted(channels)} channels but model.in_chans={cfg.model.in_chans}")
        if cfg.train.checkpoint_every % cfg.train.eval_every and keep_images:
            log.warning("train.checkpoint_every=%d is not a multiple of train.eval_every=%d: a checkpoint "
                        "carries the RankMe of the latest evaluation before it", cfg.train.checkpoint_every,
                        cfg.train.eval_every)
        images = _preprocess(items, cfg) if keep_images else torch.empty(0)
        known = None if any(lab is None for lab in labels) else torch.tensor(labels)
        if keep_images:
            log.info("label-free monitor: RankMe%s every %d steps on %d %s samples",
                     " and kNN" if known is not None else "", cfg.train.eval_every, len(items), EVAL_SPLIT)
        return cls(images, known, cfg.train.eval_every, cfg.train.max_steps)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def log(self, backbone: nn.Module, step: int, accelerator: Any, metrics: Any, run: Any) -> float | None:
        """At a due step, on every rank: rank zero evaluates and writes the row to
        ``metrics`` (and wandb ``run``); all ranks meet at a barrier. Returns the RankMe (rank
        zero) or None."""
        value = None
        if accelerator.is_main_process:
            row = self.evaluate(backbone, step, accelerator.device)
            value = row["rankme"]
            metrics.write(row)
            if run is not None:
                run.log({k: v for k, v in row.items() if k != "kind"})   # wandb wants numbers
        accelerator.wait_for_everyone()
        return value

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, step: int, device: torch.device, batch: int = 64) -> dict[str, Any]:
        """The metrics row of ``backbone`` on the fixed batch; changes no state of the run."""
        modes = [(m, m.training) for m in backbone.modules()]   # restored module by module
        backbone.eval()
        # Eval mode draws no random numbers in the methods' backbones; the fork makes that a
        # guarantee (CPU and the device's RNG come back as they were).
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                features = torch.cat([backbone(chunk.to(device)).float().cpu()
                                      for chunk in self.images.split(batch)])
        finally:
            for module, training in modes:
                module.training = training
        row: dict[str, Any] = {"step": step, "kind": "eval", "rankme": rankme(features),
                               "eval_samples": len(features)}
        if self.labels is not None:
            row["knn_acc"] = knn_accuracy(features, self.labels)
        return row


def _preprocess(items: list[dict[str, Any]], cfg: PretrainConfig, chunk: int = 16) -> torch.Tensor:
    """Deterministic network input: the sample's window to [0, 1], resized, normalised
    (volumes: the whole cube resized to ``augment.volume_crop_size``, area averaging). In
    chunks, so the float copies of 256 volumes never exist at once."""
    a, size = cfg.augment, crop_size(cfg)
    out = []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        image = torch.stack([i["image"] for i in part])
        scalars = {k: torch.tensor([i[k] for i in part], dtype=torch.float32)
                   for k in ("offset", "slope", "center", "width")}
        x = window_to_unit(image, scalars["offset"], scalars["slope"], scalars["center"], scalars["width"])
        if x.shape[-1] != size and x.ndim == 5:
            x = F.interpolate(x, size=(size,) * 3, mode="area")
        elif x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append((x.clamp(0, 1) - a.mean) / a.std)
    return torch.cat(out)
