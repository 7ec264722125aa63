"""Attention rollout (Abnar & Zuidema 2020) for timm ViTs: ``[B, C, H, W]`` -> ``[B, H, W]``.

Neither grad-cam nor captum implements rollout, so it is written here. timm's attention runs
``F.scaled_dot_product_attention`` when ``fused_attn`` is set, which never materialises the
attention matrix; ``unfused_attention`` switches it off on every attention module for the
duration of the hooks (and restores each module's own setting), so the softmax output passes
through ``attn_drop``, where a forward hook reads it.

Rollout per layer: heads fused (mean, or max), optionally the lowest ``discard_ratio`` of
weights dropped, identity added for the residual path, rows renormalised; the product over
layers says how much each input token reaches each output token. The map is the row of the
class token for class-token pooling, else the mean of the patch rows (average pooling), at
patch-grid resolution, upsampled bilinearly and min-max scaled. It is class-agnostic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.explain.cam import BATCH, vit_grid, vit_of


def attention_modules(vit: nn.Module) -> list[nn.Module]:
    """Each block's attention module (one with ``fused_attn`` and ``attn_drop``), in order."""
    mods = [m for m in vit.blocks.modules() if hasattr(m, "fused_attn") and hasattr(m, "attn_drop")]
    if not mods:
        raise ValueError("this ViT has no timm attention modules (fused_attn + attn_drop)")
    return mods


@contextmanager
def unfused_attention(vit: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, attention is computed explicitly and each layer's ``[B, heads, N, N]``
    softmax is appended to the yielded list; ``fused_attn`` is restored on exit."""
    mods = attention_modules(vit)
    saved = [m.fused_attn for m in mods]
    captured: list[torch.Tensor] = []
    handles = [m.attn_drop.register_forward_hook(lambda mod, i, o: captured.append(o.detach()))
               for m in mods]
    try:
        for m in mods:
            m.fused_attn = False
        yield captured
    finally:
        for h in handles:
            h.remove()
        for m, fused in zip(mods, saved):
            m.fused_attn = fused


def _rollout(attns: list[torch.Tensor], head_fusion: str, discard_ratio: float) -> torch.Tensor:
    n = attns[0].shape[-1]
    eye = torch.eye(n, dtype=attns[0].dtype, device=attns[0].device)
    result = eye.expand(attns[0].shape[0], n, n).clone()
    for a in attns:
        fused = a.mean(dim=1) if head_fusion == "mean" else a.amax(dim=1)
        if discard_ratio > 0:
            flat = fused.flatten(1)
            k = int(flat.shape[1] * discard_ratio)
            if k:
                low = flat.topk(k, dim=1, largest=False).indices
                flat = flat.scatter(1, low, 0.0)
                fused = flat.view_as(fused)
        fused = 0.5 * fused + 0.5 * eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        result = fused @ result
    return result


@torch.no_grad()
def attention_rollout(model: nn.Module, images: torch.Tensor, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> np.ndarray:
    """Rollout maps ``[B, H, W]`` float32 in [0, 1] of the ViT in ``model`` (or its backbone)."""
    vit = vit_of(model)
    if vit is None:
        raise ValueError("attention rollout needs a timm ViT (patch_embed, blocks, "
                         "num_prefix_tokens) as the model or its .backbone")
    if head_fusion not in ("mean", "max"):
        raise ValueError(f"head_fusion must be 'mean' or 'max', got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must lie in [0, 1), got {discard_ratio}")
    prefix = int(vit.num_prefix_tokens)
    rows, cols = vit_grid(vit, tuple(images.shape[-2:]))
    class_row = getattr(vit, "cls_token", None) is not None and getattr(
        vit, "global_pool", "token") == "token"
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(images), BATCH):
            with unfused_attention(vit) as attns:
                vit(images[s:s + BATCH])
            joint = _rollout(list(attns), head_fusion, discard_ratio)
            rows_used = joint[:, 0, prefix:] if class_row else joint[:, prefix:, prefix:].mean(1)
            grid = rows_used.reshape(-1, 1, rows, cols).float()
            up = F.interpolate(grid, size=tuple(images.shape[-2:]), mode="bilinear",
                               align_corners=False)[:, 0]
            lo = up.flatten(1).min(1).values[:, None, None]
            hi = up.flatten(1).max(1).values[:, None, None]
            out.append(((up - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float32)
