"""SimCLR: two augmented views, a projection head, and the NT-Xent loss (all from lightly).

- Chen et al. 2020, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

import timm
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from medssl.volume_models import create_volume_backbone, is_volume_arch
from pretrain.config import PretrainConfig
from pretrain.methods import register_method
from pretrain.methods.ntxent import masked_ntxent

# Sized for windowed medical intensities, not ImageNet colour: a tight window jitter and mild
# intensity changes keep tissue contrast meaningful; small rotations because scans are
# acquired in a canonical orientation; no vertical flip (anatomy has a top and bottom).
# Volumes (RAS): left-right flips only, for the same reason.
SIMCLR_AUGMENT = dict(
    scale=(0.2, 1.0), hflip_p=0.5, vflip_p=0.0, flip_axes_p=(0.5, 0.0, 0.0), rotate_degrees=10.0,
    window_center_jitter=0.1, window_width_jitter=0.2,
    intensity_p=0.8, brightness=0.1, contrast=0.2, gamma=0.25,
    blur_p=0.5, blur_sigma=(0.1, 2.0), noise_p=0.2, noise_std=0.03,
)


class SimCLR(nn.Module):
    """Backbone + lightly projection head + NT-Xent. The backbone is a timm model
    (``num_classes=0``) on 2-D views, or a ``VolumeBackbone`` (medssl/volume_models.py) on
    volumes ``[B, C, D, H, W]``: both give ``[B, num_features]``, which is all the head needs."""

    def __init__(self, backbone: nn.Module, hidden_dim: int, output_dim: int, temperature: float):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(backbone.num_features, hidden_dim, output_dim)
        # gather_distributed: negatives come from every rank's batch, as in the paper.
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)
        self.temperature = temperature

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``views``: two ``[B, C, H, W]`` batches of the same images (or of two images of one
        patient, with ``groups`` their patient ids) -> ``{"loss": scalar}``."""
        x0, x1 = views
        # One backbone pass over both views: BatchNorm sees 2B samples, and it is faster.
        z = self.projection_head(self.backbone(torch.cat([x0, x1])))
        z0, z1 = z.float().chunk(2)
        if groups is not None:   # same-patient pairs: that patient's other images are no negatives
            return {"loss": masked_ntxent(z0, z1, groups, self.temperature)}
        return {"loss": self.criterion(z0, z1)}


@register_method(
    "simclr", n_views=2, optimizer="lars",
    lr={"lars": 0.3, "sgd": 0.3, "adamw": 1e-3, "default": 0.3},
    weight_decay=1e-6, augment=SIMCLR_AUGMENT,
)
def build_simclr(cfg: PretrainConfig) -> nn.Module:
    if is_volume_arch(cfg.model.arch):
        backbone: nn.Module = create_volume_backbone(cfg.model.arch, cfg.model.in_chans, cfg.model.kwargs)
    else:
        backbone = timm.create_model(cfg.model.arch, num_classes=0, in_chans=cfg.model.in_chans,
                                     **cfg.model.kwargs)
    m = cfg.method
    return SimCLR(backbone, m.proj_hidden_dim, m.proj_output_dim, m.temperature)
