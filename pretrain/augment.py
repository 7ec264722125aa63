"""Batched on-device augmentation of medical intensity images, per-sample random parameters.

Written by hand rather than with kornia.augmentation or torchvision.transforms.v2, because:
- speed: on one H200 (ARCHITECTURE.md section 4), a kornia pipeline for 1,024 two-view 224 px
  outputs took 55 ms, about a third of a ResNet-50 SimCLR step, which alone sinks the
  90%-of-model-rate target; one batched affine ``grid_sample`` (crop, flip and rotation in a
  single resampling), elementwise intensity ops and a separable blur as one grouped
  convolution took 9 ms (~6% of a step). torchvision v2 draws one parameter set per batch,
  not per sample.
- medical intensities: inputs are uint16 stored values plus per-sample offset/slope and a
  clinical window (HU for CT). Windowing with a per-sample jittered centre/width happens on
  the device, in modality units, before anything else; colour jitter in RGB space means
  nothing for CT or MR.
- exact resume: every draw uses an explicit ``torch.Generator`` the trainer seeds from
  (seed, step, rank), so a resumed run augments exactly as the uninterrupted one.

Pipeline per view: stored -> modality units -> window (jittered) to [0, 1] -> crop + flip +
rotation (one affine grid_sample) -> brightness/contrast/gamma -> Gaussian blur -> noise ->
clamp to [0, 1] -> normalise with ``(x - mean) / std``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from medssl.sample import resolve_window
from medssl.sample import window_to_unit as window_to_unit_core
from pretrain.config import AugmentConfig
from pretrain.pairs import PARTNER


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _coin(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ...]`` broadcastable over ``x`` (images ``[B, C, H, W]`` or volumes
    ``[B, C, D, H, W]``: every elementwise op here serves both)."""
    return values.view(values.shape[0], *([1] * (x.ndim - 1)))


def window_to_unit(
    stored: torch.Tensor, offset: torch.Tensor, slope: torch.Tensor, center: torch.Tensor,
    width: torch.Tensor, cfg: AugmentConfig | None = None, g: torch.Generator | None = None,
) -> torch.Tensor:
    """Stored integers ``[B, C, H, W]`` (or volumes ``[B, C, D, H, W]``) -> float32 in [0, 1].

    Grayscale (uint16 bits in int16, or any wider integer): ``value = stored * slope + offset``
    in modality units, then the sample's window (``medssl.sample``: NaN = none, use min..max),
    its centre and width jittered per sample when ``cfg`` and ``g`` are given. uint8 RGB is
    scaled by 1/255 and not windowed.
    """
    if stored.dtype == torch.uint8:
        return stored.float() / 255.0
    b, device = stored.shape[0], stored.device
    if stored.dtype == torch.int16:  # uint16 bits carried as int16 by the loader
        stored = stored.to(torch.int32) & 0xFFFF
    values = stored.float() * per_sample(slope, stored) + per_sample(offset, stored)
    center, width = resolve_window(values, center, width)
    if cfg is not None and g is not None:
        shift = _uniform(b, -1, 1, g, device) * (cfg.window_center_jitter or 0.0)
        scale = 1 + _uniform(b, -1, 1, g, device) * (cfg.window_width_jitter or 0.0)
        center = center + shift * width
        width = width * scale
    return window_to_unit_core(values, center, width, resolve=False)


def crop_flip_rotate(x: torch.Tensor, size: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random resized crop + flips + rotation, ``[B, C, H, W]`` -> ``[B, C, size, size]``.

    One affine matrix per sample maps the output grid into the input (normalised coordinates
    [-1, 1]); ``grid_sample`` resamples once. Areas rotated in from outside the image are 0
    (the bottom of the window: air/background).
    """
    b, c, _, _ = x.shape
    device = x.device
    scale_lo, scale_hi = cfg.scale or (1.0, 1.0)
    area = _uniform(b, scale_lo, scale_hi, g, device)
    log_ratio = _uniform(b, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), g, device)
    ratio = log_ratio.exp()
    # Half-extent of the crop as a fraction of the image (1 = whole side).
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = _uniform(b, -1, 1, g, device) * (1 - w)
    cy = _uniform(b, -1, 1, g, device) * (1 - h)
    fx = torch.where(_coin(b, cfg.hflip_p or 0.0, g, device), -1.0, 1.0)
    fy = torch.where(_coin(b, cfg.vflip_p or 0.0, g, device), -1.0, 1.0)
    angle = _uniform(b, -1, 1, g, device) * math.radians(cfg.rotate_degrees or 0.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([
        torch.stack([cos * w * fx, -sin * h * fy, cx], dim=1),
        torch.stack([sin * w * fx, cos * h * fy, cy], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def intensity(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Per-sample brightness, contrast and gamma on [0, 1] images (or volumes), each with
    ``intensity_p``."""
    if not cfg.intensity_p:
        return x
    b, device = x.shape[0], x.device
    apply = per_sample(_coin(b, cfg.intensity_p or 0.0, g, device).to(x.dtype), x)
    bright = per_sample(_uniform(b, -1, 1, g, device), x) * (cfg.brightness or 0.0)
    contrast = 1 + per_sample(_uniform(b, -1, 1, g, device), x) * (cfg.contrast or 0.0)
    log_g = math.log1p(cfg.gamma or 0.0)
    gamma = per_sample(_uniform(b, -log_g, log_g, g, device).exp(), x)
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    y = ((x - mean) * contrast + mean + bright).clamp(0, 1).pow(gamma)
    return torch.lerp(x, y, apply)


def blur_kernels(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor | None:
    """Per-(sample, channel) 1-D Gaussian taps ``[B * C, K]`` (the identity where a sample is
    not blurred, with ``blur_p``), or None when no blur can apply. Shared by the 2-D and the
    3-D blur: one kernel per sample, run along every spatial axis in turn."""
    b, c = x.shape[:2]
    device = x.device
    lo, hi = cfg.blur_sigma or (0.1, 2.0)
    sigma = _uniform(b, lo, hi, g, device)
    apply = _coin(b, cfg.blur_p or 0.0, g, device)
    radius = min(math.ceil(3 * hi), (min(x.shape[2:]) - 1) // 2)
    if radius < 1:
        return None
    taps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (taps == 0).float().expand(b, -1)
    kernel = torch.where(apply[:, None], kernel, identity)        # [B, K]
    return kernel.repeat_interleave(c, dim=0).to(x.dtype)         # one kernel per (sample, channel)


def gaussian_blur(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Per-sample separable Gaussian blur with probability ``blur_p`` (grouped convolutions)."""
    if not cfg.blur_p:
        return x  # static (config) check, so MAE pays nothing for it
    kernel = blur_kernels(x, cfg, g)
    if kernel is None:
        return x
    b, c, hgt, wid = x.shape
    k = kernel.shape[1]
    radius = k // 2
    y = x.reshape(1, b * c, hgt, wid)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, k, 1), groups=b * c)
    y = F.conv2d(y, kernel.view(b * c, 1, 1, k), groups=b * c)
    return y.reshape(b, c, hgt, wid)


def gaussian_noise(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise, std uniform in [0, noise_std] per sample, with ``noise_p``
    (images or volumes)."""
    if not cfg.noise_p or not cfg.noise_std:
        return x
    b, device = x.shape[0], x.device
    std = _uniform(b, 0, cfg.noise_std or 0.0, g, device)
    std = torch.where(_coin(b, cfg.noise_p or 0.0, g, device), std, torch.zeros_like(std))
    noise = torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
    return x + noise * per_sample(std, x).to(x.dtype)


def view_source(batch: dict[str, torch.Tensor], v: int) -> dict[str, torch.Tensor]:
    """The image view ``v`` is cut from: even views from ``image``, odd views from the pair's
    other image (``partner_image``, ...) when the batch carries one (data.positives)."""
    if v % 2 and PARTNER + "image" in batch:
        return {k: batch[PARTNER + k] for k in ("image", "offset", "slope", "center", "width")}
    return batch


class GpuAugment:
    """Callable that turns a loader batch into ``n_views`` normalised, augmented views, then
    ``augment.local_crops`` smaller ones (multi-crop), all from the one decoded image.

    ``batch``: dict with ``image`` ``[B, C, L, L]`` (uint16 stored values as int32, or uint8
    RGB) and ``offset``, ``slope``, ``center``, ``width`` ``[B]`` float (modality units).
    Returns a list of float tensors, ``n_views`` of ``[B, C, crop_size, crop_size]`` then
    ``local_crops`` of ``[B, C, local_crop_size, local_crop_size]``, with ``(x - mean) / std``
    applied, where x in [0, 1] is the windowed, augmented image. Local crop ``i`` is cut from
    the image view ``i`` would be (``view_source``): with same-patient pairs, half the local
    crops come from each image.
    """

    # The geometry and the blur are what differ in 3-D (pretrain/augment3d.py overrides these);
    # the window, intensity, noise and normalisation steps are shared.
    crop = staticmethod(crop_flip_rotate)
    blur = staticmethod(gaussian_blur)
    memory_format = torch.channels_last

    def __init__(self, cfg: AugmentConfig, n_views: int, channels_last: bool = False):
        self.cfg = cfg
        self.n_views = n_views
        self.channels_last = channels_last
        # Local crops differ from global ones only in size and area: the same functions.
        self.local_cfg = dataclasses.replace(cfg, scale=cfg.local_scale)

    def __call__(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
        plan = [(v, self.cfg.crop_size, self.cfg) for v in range(self.n_views)]
        plan += [(i, self.cfg.local_crop_size, self.local_cfg) for i in range(self.cfg.local_crops)]
        return [self._view(view_source(batch, v), size, cfg, g) for v, size, cfg in plan]

    def _view(self, src: dict[str, torch.Tensor], size: int, cfg: AugmentConfig,
              g: torch.Generator) -> torch.Tensor:
        x = window_to_unit(src["image"], src["offset"], src["slope"], src["center"], src["width"], cfg, g)
        x = self.crop(x, size, cfg, g)
        x = intensity(x, cfg, g)
        x = self.blur(x, cfg, g)
        x = gaussian_noise(x, cfg, g)
        x = (x.clamp_(0, 1) - cfg.mean) / cfg.std
        if self.channels_last:
            x = x.contiguous(memory_format=self.memory_format)
        return x

    def record(self) -> dict[str, object]:
        """What the run's ``config.yaml`` records about intensities (for publish and finetune)."""
        return {
            "intensity": "stored * slope + offset -> window [center - width/2, center + width/2] "
                         "(sample's own window, else its min..max) -> [0, 1] -> (x - mean) / std",
            "normalization": {"mean": [self.cfg.mean], "std": [self.cfg.std]},
            "window_jitter": {"center": self.cfg.window_center_jitter, "width": self.cfg.window_width_jitter},
        }
