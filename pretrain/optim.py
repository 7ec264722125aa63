"""Optimizer and schedule: LARS for SimCLR, AdamW for MAE, linear warm-up then cosine."""

from __future__ import annotations

import torch
from lightly.models.utils import get_weight_decay_parameters
from lightly.utils.lars import LARS
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import TrainConfig, cosine_factor, scaled_lr


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer at the peak lr (``train.lr`` x global batch / 256).

    Norm and bias parameters get no weight decay; LARS also leaves them out of its
    layer-wise scaling (lightly's LARS skips parameters whose weight decay is 0), as in SimCLR.
    """
    decay, no_decay = get_weight_decay_parameters([model])
    decay = [p for p in decay if p.requires_grad]
    no_decay = [p for p in no_decay if p.requires_grad]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    lr = scaled_lr(cfg)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    raise ValueError(f"unresolved optimizer {cfg.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Per-step multiplier of the peak lr; its state_dict is just the step count."""
    return LambdaLR(optimizer, lambda step: cosine_factor(step, cfg))
