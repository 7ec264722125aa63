"""MAE on volumes: MONAI's ``MaskedAutoEncoderViT`` (encoder, decoder, masking) and MSE on the
masked 3-D patches.

- He et al. 2021, https://arxiv.org/abs/2111.06377

The whole MONAI net is ``backbone.net`` (a ``VolumeBackbone`` built with
``features_only=False``), so the checkpoint's ``backbone.net.<key>`` strips to keys that
``MaskedAutoEncoderViT(**kwargs)`` loads, decoder included; the backbone's own forward is
the unmasked encoder (what the monitor and fine-tuning use).

Why ``forward`` re-states MONAI's ``MaskedAutoEncoderViT.forward`` instead of calling it:
MONAI writes the decoded tokens into its fp32 mask-token tensor with an indexed assignment,
which fails under bf16 autocast ("Index put requires the source and destination dtypes
match"). The steps, modules and masking (``net._masking``: ``torch.multinomial`` on the
global CPU RNG, which the trainer reseeds every step) are MONAI's; the only change is that
cast (tests/pretrain/test_volumes.py checks equality with MONAI's forward in fp32).

Patch order: MONAI's conv patch embedding flattens the output grid (d, h, w) row-major, and
its perceptron embedding rearranges ``b c (d p1) (h p2) (w p3) -> b (d h w) (p1 p2 p3 c)``;
``patchify`` is that rearrangement, so target patch ``n`` is the voxels token ``n`` embedded.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from medssl.volume_models import create_volume_backbone
from pretrain.config import PretrainConfig


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """``[B, C, D, H, W]`` -> ``[B, N, p1 * p2 * p3 * C]`` in the patch embedding's token order."""
    p1, p2, p3 = patch
    return rearrange(x, "b c (d p1) (h p2) (w p3) -> b (d h w) (p1 p2 p3 c)", p1=p1, p2=p2, p3=p3)


class MAE3D(nn.Module):
    """``VolumeBackbone`` over ``MaskedAutoEncoderViT``; loss = MSE on the masked patches."""

    def __init__(self, backbone: nn.Module, mask_ratio: float, norm_pix_loss: bool):
        super().__init__()
        self.backbone = backbone   # the net is backbone.net only: one copy of every weight
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MONAI's forward (see the module docstring): ``(pred [B, N, p^3 * C], mask [B, N])``,
        mask 1 where a patch was hidden from the encoder."""
        net = self.backbone.net
        tokens = net.patch_embedding(x)
        kept, selected, mask = net._masking(tokens, masking_ratio=self.mask_ratio)
        b = kept.shape[0]
        h = torch.cat((net.cls_token.expand(b, -1, -1), kept), dim=1)
        h = net.decoder_embed(net.blocks(h))
        full = net.mask_tokens.repeat(b, mask.shape[1], 1).to(h.dtype)
        rows = torch.arange(b, device=h.device).unsqueeze(-1)
        full[rows, selected.to(h.device)] = h[:, 1:, :]   # no cls token
        full = full + net.decoder_pos_embedding
        h = torch.cat([h[:, :1, :].to(full.dtype), full], dim=1)
        pred = net.decoder_pred(net.decoder_blocks(h))
        return pred[:, 1:, :], mask

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``views``: one ``[B, C, D, H, W]`` batch -> ``{"loss": MSE on masked patches}``."""
        (x,) = views
        pred, mask = self.reconstruct(x)
        target = patchify(x.float(), tuple(self.backbone.net.patch_size))
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        mask = mask.to(per_patch.dtype)
        return {"loss": (per_patch * mask).sum() / mask.sum()}


def build_mae3d(cfg: PretrainConfig) -> nn.Module:
    """``method.name=mae`` with ``model.arch=monai:MaskedAutoEncoderViT`` (checked, and its
    decoder kwargs filled from ``method.*``, by pretrain/volumes.py)."""
    backbone = create_volume_backbone(cfg.model.arch, cfg.model.in_chans, cfg.model.kwargs,
                                      features_only=False)
    return MAE3D(backbone, cfg.method.mask_ratio, cfg.method.norm_pix_loss)
