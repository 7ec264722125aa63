"""What changes when ``model.arch`` is a 3-D MONAI net (``monai:<Net>``), decided in one place.

The method names stay (simclr, mae): the arch alone chooses 2-D or 3-D, so a config switches
by changing ``model.arch``. From it follow: the sizes (``data.volume_size`` /
``augment.volume_crop_size`` instead of ``data.load_size`` / ``augment.crop_size``), the
memory layout (channels_last_3d), the augmentation (pretrain/augment3d.py), the model kwargs
a MONAI net needs (``img_size`` = the crop; MAE's decoder from ``method.*``), and which shards
fit: a volume arch on 2-D shards, or a 2-D arch on volume shards, is refused before any work
with one line naming the folder.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from medssl.data.sample import VOLUME_MEMBER
from medssl.errors import ConfigError, MedsslError
from medssl.volume_models import is_volume_arch, net_name
from pretrain.config import PretrainConfig

#: Methods with a 3-D version (pretrain/methods branch on the arch).
VOLUME_METHODS = ("simclr", "mae")
MAE_NET = "MaskedAutoEncoderViT"
#: Augment keys only volume runs use; left unset (None) on 2-D runs.
VOLUME_ONLY_AUGMENT = ("flip_axes_p",)
#: MONAI MaskedAutoEncoderViT kwargs that ``method.*`` sets (one source of truth per number).
_MAE_FROM_METHOD = {"masking_ratio": "mask_ratio", "decoder_hidden_size": "decoder_dim",
                    "decoder_num_layers": "decoder_depth", "decoder_num_heads": "decoder_heads"}


def is_volume(cfg: PretrainConfig) -> bool:
    return is_volume_arch(cfg.model.arch)


def load_size(cfg: PretrainConfig) -> int:
    """Side of what the CPU loader emits: a square (2-D) or a cube (volumes)."""
    return cfg.data.volume_size if is_volume(cfg) else cfg.data.load_size


def crop_size(cfg: PretrainConfig) -> int:
    """Side of the views the model sees."""
    return cfg.augment.volume_crop_size if is_volume(cfg) else cfg.augment.crop_size


def memory_format(cfg: PretrainConfig) -> torch.memory_format | None:
    """``train.channels_last``: NHWC for 2-D, NDHWC (channels_last_3d) for volumes; None when off."""
    if not cfg.train.channels_last:
        return None
    return torch.channels_last_3d if is_volume(cfg) else torch.channels_last


def make_augment(cfg: PretrainConfig, n_views: int):
    """The device augmentation for this arch: ``GpuAugment`` (2-D) or ``VolumeAugment``."""
    if is_volume(cfg):
        from pretrain.augment3d import VolumeAugment

        return VolumeAugment(cfg.augment, n_views, cfg.train.channels_last)
    from pretrain.augment import GpuAugment

    return GpuAugment(cfg.augment, n_views, cfg.train.channels_last)


def resolve_volume_model(cfg: PretrainConfig) -> PretrainConfig:
    """A volume run's ``model.kwargs`` completed for the method; ConfigError for what cannot work.

    - only methods with a 3-D version; MAE only on monai:MaskedAutoEncoderViT;
    - no multi-crop, no ImageNet/ssl start (no 3-D source for them here);
    - ``img_size`` (nets that take it) is ``augment.volume_crop_size``;
    - MAE: ``masking_ratio`` and the decoder sizes come from ``method.*``, so the saved config
      (and publish) rebuild exactly the trained net.
    A config that sets one of these in ``model.kwargs`` to something else is refused.
    """
    if not is_volume(cfg):
        return cfg
    arch, m = cfg.model.arch, cfg.method
    name = net_name(arch)
    if m.name not in VOLUME_METHODS:
        raise ConfigError(f"method.name={m.name} has no 3-D version (model.arch={arch}); use one of "
                          f"{' | '.join(VOLUME_METHODS)}, or a timm model.arch for 2-D")
    if m.name == "mae" and name != MAE_NET:
        raise ConfigError(f"method.name=mae on volumes needs model.arch=monai:{MAE_NET}, got {arch}")
    if cfg.augment.local_crops:
        raise ConfigError(f"augment.local_crops={cfg.augment.local_crops}: no multi-crop for volumes; "
                          "set augment.local_crops=0")
    wanted: dict[str, Any] = {}
    from monai.networks import nets

    if "img_size" in inspect.signature(getattr(nets, name)).parameters:
        wanted["img_size"] = cfg.augment.volume_crop_size
    if m.name == "mae":
        wanted.update({key: getattr(m, attr) for key, attr in _MAE_FROM_METHOD.items()})
    kwargs = dict(cfg.model.kwargs)
    for key, value in wanted.items():
        given = kwargs.get(key, value)
        if given != value:
            src = "augment.volume_crop_size" if key == "img_size" else f"method.{_MAE_FROM_METHOD[key]}"
            raise ConfigError(f"model.kwargs.{key}={given!r} contradicts {src}={value!r}; drop it "
                              f"from model.kwargs (medssl sets it)")
        kwargs[key] = value
    if name == "SwinUNETR":   # its encoder halves the grid five times (MONAI's own input check)
        step = int(kwargs.get("patch_size", 2)) ** 5
        size = cfg.augment.volume_crop_size
        if size % step:
            raise ConfigError(f"augment.volume_crop_size {size} must be a multiple of {step} for "
                              f"monai:SwinUNETR (patch_size^5); use e.g. {max(step, round(size / step) * step)}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kwargs=kwargs))


def shards_are_volumes(urls: list[str], spec: str) -> bool | None:
    """Whether the shards hold volumes: index.json's ``config.volumes`` when the folder has
    one, and the first sample's members (``vol.npy.gz`` vs ``img.png``); None when unreadable.
    A folder whose index and samples disagree is refused."""
    flag = None
    folder = Path(spec) if Path(spec).is_dir() else Path(urls[0]).parent if urls else None
    if folder is not None and (folder / "index.json").is_file():
        try:
            config = json.loads((folder / "index.json").read_text()).get("config") or {}
            flag = bool(config["volumes"]) if "volumes" in config else None
        except (OSError, ValueError, AttributeError):
            flag = None
    member = None
    if urls and "://" not in urls[0] and not urls[0].startswith("pipe:"):   # local: one member read
        import webdataset as wds

        samples = wds.tarfile_samples(iter([{"url": urls[0]}]), handler=wds.ignore_and_continue)
        first = next(iter(itertools.islice(samples, 1)), None)
        if first is not None:
            member = VOLUME_MEMBER in first if (VOLUME_MEMBER in first or "img.png" in first
                                                or "png" in first) else None
    if flag is not None and member is not None and flag != member:
        raise MedsslError(f"data.shards {spec}: index.json says volumes={flag} but {urls[0]} holds "
                          f"{'volumes' if member else '2-D images'}; reshard it")
    return flag if flag is not None else member


def check_shards_fit(cfg: PretrainConfig) -> None:
    """Refuse a 3-D arch on 2-D shards and a 2-D arch on volume shards, naming the folder.
    Shards that cannot be listed yet are left to the trainer's own check."""
    from pretrain.data import resolve_shards

    try:
        urls = resolve_shards(cfg.data.shards, cfg.data.split)
    except MedsslError:
        return
    volumes = shards_are_volumes(urls, cfg.data.shards)
    if volumes is None or volumes == is_volume(cfg):
        return
    if volumes:
        raise ConfigError(f"data.shards {cfg.data.shards} holds volumes (vol.npy.gz) but model.arch="
                          f"{cfg.model.arch} is 2-D; use a monai:<Net> model.arch (e.g. monai:ResNet)")
    raise ConfigError(f"data.shards {cfg.data.shards} holds 2-D images but model.arch={cfg.model.arch} "
                      "is 3-D; use a timm model.arch, or shards written with `medssl shard --volumes`")
