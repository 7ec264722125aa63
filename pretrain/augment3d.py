"""Batched on-device augmentation of volumes ``[B, C, D, H, W]``, per-sample random parameters.

The 3-D sibling of pretrain/augment.py, for the same reasons (speed, medical intensities, exact
resume through an explicit ``torch.Generator``), and built from its pieces: windowing with
per-sample jitter (``window_to_unit``), brightness/contrast/gamma, noise and the Gaussian taps
are the 2-D functions, which work on any number of spatial axes. What is 3-D here:

- crop + flips + rotation in ONE ``F.affine_grid``/``F.grid_sample`` over the batch (a 3 x 4
  matrix per sample), instead of MONAI's per-sample dictionary transforms on the CPU;
- the blur: the same per-sample taps run along D, H and W as three grouped ``conv3d``.

Axes: the loader's cube is ``[C, X, Y, Z]`` in RAS (medssl.data.sample), so D, H, W are x
(left->Right), y (posterior->Anterior), z (inferior->Superior); ``augment.flip_axes_p`` is in
that order. The cube is isotropic in normalised coordinates (all sides equal), so a rotation
there is a true rotation.

Pipeline per view: stored -> modality units -> window (jittered) to [0, 1] -> crop + flips +
rotation (one grid_sample) -> brightness/contrast/gamma -> blur -> noise -> clamp to [0, 1] ->
``(x - mean) / std``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.augment import (
    GpuAugment,
    _coin,
    _uniform,
    blur_kernels,
    view_source,
)
from pretrain.config import AugmentConfig


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """``[B, 3]`` angles (radians, about D, H, W in turn) -> ``[B, 3, 3]`` rotations
    ``R_W @ R_H @ R_D`` acting on (d, h, w) coordinates."""
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def rot(i: int, j: int, k: int) -> torch.Tensor:
        # Rotation in the (j, k) plane about axis i.
        m = [[None] * 3 for _ in range(3)]
        m[i][i], m[i][j], m[i][k] = one, zero, zero
        m[j][i], m[k][i] = zero, zero
        m[j][j], m[j][k], m[k][j], m[k][k] = c[:, i], -s[:, i], s[:, i], c[:, i]
        return torch.stack([torch.stack(row, dim=1) for row in m], dim=1)

    return rot(2, 0, 1) @ rot(1, 2, 0) @ rot(0, 1, 2)


def affine_resample(x: torch.Tensor, size: int, extent: torch.Tensor, centre: torch.Tensor,
                    flips: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """``[B, C, D, H, W]`` -> ``[B, C, size, size, size]`` by one affine ``grid_sample``.

    Per sample, in (d, h, w) order and normalised coordinates ([-1, 1] spans the input):
    ``extent`` ``[B, 3]`` half-sides of the crop (1 = the whole axis), ``centre`` ``[B, 3]``
    its centre, ``flips`` ``[B, 3]`` +-1, ``angles`` ``[B, 3]`` radians. An output point u maps
    to ``R @ (extent * flips * u) + centre`` in the input. Voxels rotated in from outside are
    0 (the bottom of the window: air/background).
    """
    b, c = x.shape[:2]
    linear = rotation_matrices(angles) @ torch.diag_embed(extent * flips)     # [B, 3, 3] on (d, h, w)
    theta = torch.cat([linear, centre[:, :, None]], dim=2)                      # [B, 3, 4]
    # affine_grid's coordinates are (w, h, d): reverse both the rows and the columns.
    theta = torch.cat([theta[:, :, :3].flip(1).flip(2), theta[:, :, 3:].flip(1)], dim=2)
    grid = F.affine_grid(theta, [b, c, size, size, size], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(b: int, cfg: AugmentConfig, g: torch.Generator, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (extent, centre, flips, angles) of a random resized crop with flips and
    rotations: the crop's volume is ``augment.scale`` of the cube's, and each pair of its
    sides keeps an aspect ratio within ``augment.ratio`` (for a range symmetric in log)."""
    lo, hi = cfg.scale or (1.0, 1.0)
    volume = _uniform(b, lo, hi, g, device)
    log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    shape = torch.stack([_uniform(b, log_lo / 2, log_hi / 2, g, device) for _ in range(3)], dim=1)
    shape = shape - shape.mean(dim=1, keepdim=True)            # sides multiply to the volume
    extent = (volume.log()[:, None] / 3 + shape).exp().clamp(max=1.0)
    centre = torch.stack([_uniform(b, -1, 1, g, device) for _ in range(3)], dim=1) * (1 - extent)
    probs = cfg.flip_axes_p or (0.0, 0.0, 0.0)
    flips = torch.stack([torch.where(_coin(b, p, g, device), -1.0, 1.0) for p in probs], dim=1)
    limit = math.radians(cfg.rotate_degrees or 0.0)
    angles = torch.stack([_uniform(b, -1, 1, g, device) for _ in range(3)], dim=1) * limit
    return extent, centre, flips, angles


def crop_flip_rotate_3d(x: torch.Tensor, size: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random resized crop + per-axis flips + rotations, ``[B, C, L, L, L]`` -> ``[B, C, size]^3``."""
    return affine_resample(x, size, *random_affine(x.shape[0], cfg, g, x.device))


def gaussian_blur_3d(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Per-sample separable 3-D Gaussian blur with ``blur_p``: the 2-D path's taps along D, H, W."""
    if not cfg.blur_p:
        return x
    kernel = blur_kernels(x, cfg, g)
    if kernel is None:
        return x
    b, c, d, h, w = x.shape
    k = kernel.shape[1]
    r = k // 2
    y = F.pad(x.reshape(1, b * c, d, h, w), (r, r, r, r, r, r), mode="reflect")
    for shape in ((k, 1, 1), (1, k, 1), (1, 1, k)):
        y = F.conv3d(y, kernel.view(b * c, 1, *shape), groups=b * c)
    return y.reshape(b, c, d, h, w)


class VolumeAugment(GpuAugment):
    """``GpuAugment`` for volume batches: ``n_views`` normalised views
    ``[B, C, volume_crop_size, volume_crop_size, volume_crop_size]`` of each loader cube
    ``[B, C, L, L, L]`` (no multi-crop). With same-patient pairs, odd views come from the
    partner volume (``view_source``), as in 2-D."""

    crop = staticmethod(crop_flip_rotate_3d)
    blur = staticmethod(gaussian_blur_3d)
    memory_format = torch.channels_last_3d

    def __call__(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
        size = self.cfg.volume_crop_size
        return [self._view(view_source(batch, v), size, self.cfg, g) for v in range(self.n_views)]

    def record(self) -> dict[str, object]:
        return {**super().record(), "volumes": {"crop_size": self.cfg.volume_crop_size,
                                                "flip_axes_p": list(self.cfg.flip_axes_p or ())}}
