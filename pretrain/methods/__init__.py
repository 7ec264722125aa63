"""Registry of SSL methods: each pairs a model with its augmentation and optimizer defaults.

A method is one file in this folder that decorates a builder with ``@register_method``. The
builder returns an ``nn.Module`` with this contract (the trainer, pretrain/trainer.py, is its
only caller):

- ``forward(views, groups=None)``: ``views`` is the list of augmented batches ``[B, C, H, W]``
  (``n_views`` of them; sizes may differ, e.g. DINO's local crops), ``groups`` an int64 ``[B]``
  patient id per sample when ``data.positives`` pairs images of one patient (else None).
  Returns a dict of detached-or-not scalars: ``"loss"`` is minimised, every other key is a
  monitor averaged over the log interval and written to metrics.jsonl and wandb.
- optional ``after_backbone_init()``: after ``model.init`` loaded weights into ``backbone``
  (pretrain/init.py), e.g. to start a second copy of it (DINO's student) equal.
- optional ``before_optimizer_step(step)``: after backward and clipping, before the update
  (e.g. cancel gradients of a frozen layer); ``step`` is 0-based.
- optional ``after_optimizer_step(step)``: after an applied update (e.g. an EMA teacher).
- optional ``check_health(row) -> str | None``: given each logged metrics row, a message
  when training has failed beyond repair (e.g. collapse); the run stops with it.
- ``backbone``: the timm model (``num_classes=0``) that is published, so the checkpoint's
  ``backbone.`` prefix yields a plain timm state dict.

Volumes: a ``monai:<Net>`` ``model.arch`` makes the same method names 3-D (each builder
branches on ``medssl.volume_models.is_volume_arch``; pretrain/volumes.py says which exist):
``views`` are ``[B, C, D, H, W]`` and ``backbone`` is a ``VolumeBackbone`` whose ``net`` is the
MONAI network, so the checkpoint's ``backbone.net.`` prefix yields a plain MONAI state dict.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from pretrain.config import PretrainConfig

#: Modules imported on first use; a new method is one more file and one more name here.
_METHOD_MODULES = ("pretrain.methods.simclr", "pretrain.methods.mae", "pretrain.methods.dino")

BACKBONE_PREFIX = "backbone."


@dataclass(frozen=True)
class MethodSpec:
    name: str
    build: Callable[[PretrainConfig], nn.Module]
    n_views: int                               # augmented views per image
    optimizer: str                             # default for train.optimizer=auto
    lr: dict[str, float]                       # base lr per 256 samples, by optimizer ("default")
    weight_decay: float
    augment_defaults: dict[str, Any] = field(default_factory=dict)
    # The model is built for exactly augment.crop_size (ViT position embeddings): recorded as
    # model.kwargs.img_size so the saved config rebuilds the same timm model (publish needs it).
    fixed_input_size: bool = False
    # Takes augment.local_crops extra views after its n_views global ones (DINO's multi-crop).
    multi_crop: bool = False


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    n_views: int,
    optimizer: str,
    lr: dict[str, float],
    weight_decay: float,
    augment: dict[str, Any],
    fixed_input_size: bool = False,
    multi_crop: bool = False,
) -> Callable[[Callable[[PretrainConfig], nn.Module]], Callable[[PretrainConfig], nn.Module]]:
    """Decorator: register ``build(cfg) -> nn.Module`` under ``name`` with its defaults."""

    def wrap(build: Callable[[PretrainConfig], nn.Module]) -> Callable[[PretrainConfig], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"SSL method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, build, n_views, optimizer, dict(lr), weight_decay, dict(augment),
                                     fixed_input_size, multi_crop)
        return build

    return wrap


def _load_all() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(module)


def available_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown SSL method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
