"""Initialisation sources: ``ssl:DIR`` (a published dir), ``imagenet`` and ``random``.

(3-D suites, ``model.arch: monai:<Net>``, build theirs in finetune/inits3d.py.)

All three build the same timm architecture through ``medssl.models.create_backbone``, so a
comparison differs only in the starting weights. Each source also fixes the input recipe:
channels, mean/std and (for grayscale scans) the intensity window.

- ssl:DIR: channels, mean, std and window from the published ``config.json`` pretrained_cfg.
- imagenet: the mean/std the weights were trained with (``medssl.models.backbone_input_cfg``);
  on grayscale input in_chans=1 with timm's own first-conv adaptation (it sums the RGB
  filters), and mean/std = the average of the RGB ones, so a gray pixel is normalised like
  the RGB image it stands for.
- random: timm's default mean/std for the arch (averaged likewise for one channel).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from torch import nn

from medssl.errors import MedsslError
from medssl.init import Init
from medssl.io import sha256_file

log = logging.getLogger(__name__)


@dataclass
class InitSource:
    init: Init
    label: str                # short display name: ssl:<dirname> | imagenet | random
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    window: tuple[float, float] | None   # (center, width) for grayscale; None = sample's own
    make: Callable[[], nn.Module]        # a fresh backbone with these weights, per call
    input_size: tuple[int, ...] | None = None   # 3-D: the (X, Y, Z) cube it takes
    spatial_dims: int = 2


def fingerprint(init: Init, imagenet_weights: str | None) -> str:
    """What identifies the weights, for cell keys: an ssl dir's SHA256SUMS digest (so re-published
    weights never reuse old cells), the ImageNet file, or the init name."""
    if init.is_ssl:
        sums = init.path / "SHA256SUMS"
        if not sums.is_file():
            raise MedsslError(f"inits: {init}: {sums} not found; is it a `medssl publish` dir?")
        return "ssl:" + hashlib.sha256(sums.read_bytes()).hexdigest()[:16]
    if init.kind == "imagenet":
        return f"imagenet:{Path(imagenet_weights).name if imagenet_weights else 'auto'}"
    if init.is_monai_ssl:
        path = Path(init.path)
        if not path.is_file():
            raise MedsslError(f"inits: {init}: file not found (MONAI's model_swinvit.pt, downloaded by hand)")
        stat = path.stat()
        return "monai-ssl:" + _file_digest(str(path), stat.st_size, stat.st_mtime)[:16]
    return init.kind


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime: float) -> str:
    # Cell keys are asked for once per cell: hash a weights file once per (size, mtime).
    return sha256_file(path)


def load_init(init: Init, arch: str, data_channels: int, in_chans: int | None,
              imagenet_weights: str | None) -> InitSource:
    """Build the backbone once (checking the weights) and derive its input recipe.

    Raises WeightsUnavailable when ImageNet weights cannot be had; the runner records a skip.
    """
    from medssl.models import backbone_input_cfg, create_backbone

    window = None
    if init.is_ssl:
        chans, window = _published_input(init)
    else:
        chans = in_chans or data_channels
    kwargs = {"imagenet_weights": imagenet_weights} if init.kind == "imagenet" else {}

    def make() -> nn.Module:
        return create_backbone(arch, chans, init, **kwargs)

    cfg = backbone_input_cfg(make())
    return InitSource(init=init, label=init.label, in_chans=chans,
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), window=window, make=make)


def _published_input(init: Init) -> tuple[int, tuple[float, float] | None]:
    from medssl.published import read_published

    published = read_published(init.path)
    return published.in_chans, published.window
