"""MAE: mask most patches of a ViT's input and regress their pixels (lightly's masked ViT).

- He et al. 2021, https://arxiv.org/abs/2111.06377
"""

from __future__ import annotations

import timm
import torch
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerTIMM
from lightly.models.modules.masked_vision_transformer_decoder_timm import (
    MaskedVisionTransformerDecoderTIMM,
)
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medssl.errors import ConfigError
from medssl.volume_models import is_volume_arch
from pretrain.config import PretrainConfig
from pretrain.methods import register_method

# MAE needs no heavy augmentation: masking is the pretext task (paper: crop + flip only).
MAE_AUGMENT = dict(
    scale=(0.2, 1.0), hflip_p=0.5, vflip_p=0.0, flip_axes_p=(0.5, 0.0, 0.0), rotate_degrees=0.0,
    window_center_jitter=0.0, window_width_jitter=0.0,
    intensity_p=0.0, brightness=0.0, contrast=0.0, gamma=0.0,
    blur_p=0.0, blur_sigma=(0.1, 2.0), noise_p=0.0, noise_std=0.0,
)


class MAE(nn.Module):
    """Masked encoder over a timm ViT, a light decoder, MSE on the masked patches.

    ``backbone`` is the timm ViT itself (``num_classes=0``), so stripping ``backbone.``
    from the checkpoint gives timm weights; the mask token lives in the encoder wrapper.
    """

    def __init__(self, vit: VisionTransformer, mask_ratio: float, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int, norm_pix_loss: bool):
        super().__init__()
        self.encoder = MaskedVisionTransformerTIMM(vit=vit)
        # The encoder only ever sees kept tokens (idx_keep), so its own mask token is unused;
        # a trainable parameter without a gradient makes DDP fail on the second step.
        self.encoder.mask_token.requires_grad_(False)
        self.backbone = vit   # same module object as encoder.vit; registered for the prefix
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = vit.patch_embed.patch_size[0]
        self.num_prefix = vit.num_prefix_tokens
        self.sequence_length = self.encoder.sequence_length
        # lightly's MAEDecoderTIMM is deprecated in favour of this decoder plus our own
        # input embedding and pixel prediction layers (lightly's migration pattern).
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=decoder_dim, depth=decoder_depth,
            num_heads=decoder_heads, num_prefix_tokens=self.num_prefix,
        )
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * vit.patch_embed.proj.in_channels)

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``views``: one ``[B, C, H, W]`` batch -> ``{"loss": MSE on masked patches}``."""
        (images,) = views
        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(b, self.sequence_length), mask_ratio=self.mask_ratio, device=images.device,
        )
        tokens = self.encoder.encode(images, idx_keep=idx_keep)
        tokens = self.decoder_embed(tokens)
        full = utils.repeat_token(self.decoder.mask_token, (b, self.sequence_length))
        full = utils.set_at_index(full, idx_keep, tokens.type_as(full))
        decoded = self.decoder(full)
        pred = self.decoder_pred(utils.get_at_index(decoded, idx_mask)).float()

        # Token indices count the prefix (class) token; patches do not.
        target = utils.patchify(images.float(), self.patch_size)
        target = utils.get_at_index(target, idx_mask - self.num_prefix)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return {"loss": nn.functional.mse_loss(pred, target)}


@register_method(
    "mae", n_views=1, optimizer="adamw",
    lr={"adamw": 1.5e-4, "default": 1.5e-4},
    weight_decay=0.05, augment=MAE_AUGMENT, fixed_input_size=True,
)
def build_mae(cfg: PretrainConfig) -> nn.Module:
    if is_volume_arch(cfg.model.arch):   # 3-D: MONAI's MaskedAutoEncoderViT (methods/mae3d.py)
        from pretrain.methods.mae3d import build_mae3d

        return build_mae3d(cfg)
    needs = (f"model.arch {cfg.model.arch!r}: MAE needs a timm VisionTransformer "
             "(e.g. vit_base_patch16_224)")
    try:
        vit = timm.create_model(cfg.model.arch, num_classes=0, in_chans=cfg.model.in_chans, **cfg.model.kwargs)
    except TypeError as exc:   # a CNN refuses the img_size MAE fixes: say what is wrong
        if "img_size" in str(exc):
            raise ConfigError(f"{needs}; method.name=mae does not fit this architecture") from None
        raise
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"{needs}, got {type(vit).__name__}")
    if vit.num_prefix_tokens != 1 or vit.patch_embed.dynamic_img_pad:
        raise ConfigError(f"model.arch {cfg.model.arch!r}: MAE here needs exactly one class token "
                          "and no dynamic padding")
    m = cfg.method
    return MAE(vit, m.mask_ratio, m.decoder_dim, m.decoder_depth, m.decoder_heads, m.norm_pix_loss)
