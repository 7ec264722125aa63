"""Grad-CAM class-activation maps for CNNs and ViTs: ``[B, C, H, W]`` images -> ``[B, H, W]``.

Library: ``grad-cam`` (pytorch-grad-cam, jacobgil), the most used Grad-CAM implementation for
PyTorch; it hooks a target layer, takes ``ReLU(sum_c mean(dy/dA_c) * A_c)``, resizes to the
input and min-max scales each map to [0, 1], and takes a ``reshape_transform`` for token
models. captum's ``LayerGradCam`` does the same arithmetic but leaves upsampling, scaling and
the token reshape to the caller. What is ours: choosing the target layer from the model (timm's
``feature_info``, else the last module with a spatial 4-D output) and building the ViT reshape
from the model itself (``num_prefix_tokens``: class and register tokens; the patch grid from
``patch_embed``, so non-square and non-14x14 grids work).

The ViT target is ``blocks[-1].norm1``: a class-token model reads only its class token after
the last block, so gradients at that block's output are zero on patch tokens, while its first
norm feeds the attention that mixes patches into the class token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

#: Maps explained per forward pass: bounds memory on large inputs.
BATCH = 32


def vit_of(model: nn.Module) -> nn.Module | None:
    """The timm VisionTransformer inside ``model`` (itself, or its ``.backbone``), else None."""
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is not None and all(hasattr(candidate, a) for a in
                                         ("patch_embed", "blocks", "num_prefix_tokens")):
            return candidate
    return None


def vit_grid(vit: nn.Module, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Patch-grid (rows, cols) of a ViT for an input of ``image_hw`` pixels."""
    pe = vit.patch_embed
    if getattr(pe, "dynamic_img_size", False) or getattr(vit, "dynamic_img_size", False):
        return tuple(int(v) for v in pe.dynamic_feat_size(image_hw))
    return tuple(int(v) for v in pe.grid_size)


def vit_reshape(vit: nn.Module, image_hw: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[B, N, D]`` tokens -> ``[B, D, rows, cols]``, dropping the model's prefix tokens."""
    prefix = int(vit.num_prefix_tokens)
    rows, cols = vit_grid(vit, image_hw)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        if patches.shape[1] != rows * cols:
            raise ValueError(f"ViT has {tokens.shape[1]} tokens; expected {prefix} prefix + "
                             f"{rows}x{cols} patch tokens")
        return patches.reshape(len(tokens), rows, cols, -1).permute(0, 3, 1, 2)

    return reshape


def _modules_in_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, tuple]]:
    """(name, output shape) of every module in the order their forwards finished."""
    seen: list[tuple[str, tuple]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_hook(
            lambda m, i, o, name=name: seen.append((name, tuple(o.shape)))
            if isinstance(o, torch.Tensor) else None))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def conv_target(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module]:
    """The CNN layer Grad-CAM hooks: the last feature stage with a spatial map at this size.

    Candidates are timm's ``feature_info`` modules where the model (or its ``.backbone``) has
    them, else every module; of those, the last to finish with a 4-D output larger than 1x1
    (a 1x1 map cannot localise: small inputs fall back to an earlier stage).
    """
    names: set[str] | None = None
    for prefix, owner in (("", model), ("backbone.", getattr(model, "backbone", None))):
        info = getattr(owner, "feature_info", None) if owner is not None else None
        if isinstance(info, list) and info and all(isinstance(d, dict) for d in info):
            names = {prefix + d["module"] for d in info}
            break
    spatial = [(n, s) for n, s in _modules_in_order(model, example)
               if len(s) == 4 and s[2] * s[3] > 1]
    chosen = [n for n, _ in spatial if names is None or n in names] or [n for n, _ in spatial]
    if not chosen:
        raise ValueError("no module of this model outputs a spatial [B, C, H, W] map at an input "
                         f"of {tuple(example.shape[-2:])}: Grad-CAM needs one")
    name = chosen[-1]
    return name, model.get_submodule(name)


class _Logit(nn.Module):
    """Wraps a target class for pytorch-grad-cam: the raw logit of that class."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[..., self.index]


def grad_cam(model: nn.Module, images: torch.Tensor, targets: Sequence[int],
             layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM maps ``[B, H, W]`` float32 in [0, 1] for class ``targets[b]`` of image ``b``.

    ``images`` ``[B, C, H, W]`` as the model takes them; ``model(images) -> [B, n_out]`` logits.
    The layer is found from the model unless given. An all-zero map means no positive evidence
    for the class at that layer. The model's train/eval mode and parameter gradients are left
    as they were found.
    """
    from pytorch_grad_cam import GradCAM

    if len(targets) != len(images):
        raise ValueError(f"{len(targets)} targets for {len(images)} images")
    vit = vit_of(model)
    reshape = None
    if vit is not None:
        layer = layer if layer is not None else vit.blocks[-1].norm1
        reshape = vit_reshape(vit, tuple(images.shape[-2:]))
    elif layer is None:
        _, layer = conv_target(model, images)
    was_training = model.training
    grads = {n: p.grad for n, p in model.named_parameters()}
    cam = GradCAM(model=model, target_layers=[layer], reshape_transform=reshape)
    try:
        out = [cam(input_tensor=images[s:s + BATCH],
                   targets=[_Logit(int(t)) for t in targets[s:s + BATCH]])
               for s in range(0, len(images), BATCH)]
    finally:
        # Not the context manager: its __exit__ prints and swallows IndexError.
        cam.activations_and_grads.release()
        model.train(was_training)
        for n, p in model.named_parameters():
            p.grad = grads[n]
    return np.concatenate(out).astype(np.float32)
