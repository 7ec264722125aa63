"""From a loaded config to the one that runs: method defaults filled, every mistake found first.

``resolve_config`` is what ``medssl pretrain`` calls right after loading the YAML and overrides,
before the run dir is touched. It fills each ``None`` in ``augment`` and ``train`` from the
method's registry entry, then checks that the model can be built and run: ``model.arch`` must
be a timm model, and the method is built and its backbone given one batch on PyTorch's meta
device (shapes only, no memory, no arithmetic), so a MAE on a ResNet, an unknown arch or a crop size a ViT's
patch size does not divide exits 2 with one line, having written nothing; so does a
``model.init`` whose weights cannot be had here (pretrain/init.py). A ``monai:<Net>`` arch
(volumes) is completed and checked by pretrain/volumes.py the same way, and must fit the
shards: 3-D on volume shards, 2-D on image shards.
"""

from __future__ import annotations

import dataclasses

from medssl.errors import ConfigError
from medssl.volume_models import is_volume_arch
from pretrain.config import AugmentConfig, PretrainConfig
from pretrain.init import check_init
from pretrain.methods import MethodSpec, available_methods, get_method
from pretrain.volumes import VOLUME_ONLY_AUGMENT, check_shards_fit, resolve_volume_model


def resolve_config(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` with the method's defaults filled in, checked to build and run; ConfigError else."""
    cfg = resolve_method_defaults(cfg)
    check_shards_fit(cfg)
    check_model(cfg, get_method(cfg.method.name))
    check_init(cfg)
    return cfg


def resolve_method_defaults(cfg: PretrainConfig) -> PretrainConfig:
    """Fill every ``None`` in ``augment`` and ``train`` from the method's registry entry."""
    names = available_methods()
    if cfg.method.name not in names:
        raise ConfigError(f"method.name must be one of {' | '.join(names)}, got {cfg.method.name!r}")
    spec = get_method(cfg.method.name)
    aug = dict(dataclasses.asdict(cfg.augment))
    # Volume-only keys stay unset on 2-D runs: a run dir recorded before they existed then
    # still resumes (an unset new key is its declared default).
    skip = () if is_volume_arch(cfg.model.arch) else VOLUME_ONLY_AUGMENT
    for key, value in spec.augment_defaults.items():
        if aug.get(key) is None and key not in skip:
            aug[key] = value
    missing = [k for k, v in aug.items() if v is None and k not in skip]
    if missing:
        raise ConfigError(f"method {spec.name!r} gives no default for augment.{missing[0]}; set it")
    train = cfg.train
    optimizer = spec.optimizer if train.optimizer == "auto" else train.optimizer
    updates = dict(
        optimizer=optimizer,
        lr=train.lr if train.lr is not None else spec.lr[optimizer if optimizer in spec.lr else "default"],
        weight_decay=train.weight_decay if train.weight_decay is not None else spec.weight_decay,
    )
    if aug["local_crops"] and not spec.multi_crop:
        raise ConfigError(f"augment.local_crops={aug['local_crops']}: method {spec.name!r} takes no local "
                          "crops (multi-crop is DINO's); set augment.local_crops=0")
    model = cfg.model
    if is_volume_arch(model.arch):   # MONAI kwargs and 3-D limits: pretrain/volumes.py
        return resolve_volume_model(dataclasses.replace(cfg, augment=AugmentConfig(**aug),
                                                        train=dataclasses.replace(train, **updates)))
    if spec.fixed_input_size:
        size = aug["crop_size"]
        if model.kwargs.get("img_size", size) != size:
            raise ConfigError(f"model.kwargs.img_size {model.kwargs['img_size']} must equal augment.crop_size "
                              f"{size} for method {spec.name!r}; drop it or make them equal")
        model = dataclasses.replace(model, kwargs={**model.kwargs, "img_size": size})
    return dataclasses.replace(cfg, model=model, augment=AugmentConfig(**aug),
                               train=dataclasses.replace(train, **updates))


def check_model(cfg: PretrainConfig, spec: MethodSpec) -> None:
    """Build the method on the meta device and run one tiny batch through it; ConfigError naming
    the keys to change when that fails."""
    import timm
    import torch

    arch = cfg.model.arch
    if is_volume_arch(arch):
        return _check_volume_model(cfg, spec)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ConfigError(f"model.arch {arch!r} is not a timm model name{hint}")
    size = cfg.augment.crop_size
    where = (f"method.name={spec.name} with model.arch={arch}, model.in_chans={cfg.model.in_chans}, "
             f"augment.crop_size={size}")
    try:
        with torch.device("meta"):
            model = spec.build(cfg)
            _check_patches(model, arch, size)
            # The backbone, not the whole method: losses use ops (nonzero) meta tensors lack.
            model.backbone(torch.empty(2, cfg.model.in_chans, size, size))
    except ConfigError:
        raise
    except Exception as exc:   # noqa: BLE001  timm and lightly raise many types for a misfit
        text = str(exc).strip().splitlines()
        reason = text[-1].strip() if text else type(exc).__name__
        raise ConfigError(f"{where} cannot work: {reason}") from None


def _check_volume_model(cfg: PretrainConfig, spec: MethodSpec) -> None:
    """The 3-D counterpart of ``check_model``: build on the meta device, one meta batch through
    the backbone's feature path. A net whose forward needs real values (SwinUNETR reads one
    with ``.item()``) is only built; its size rule is checked by pretrain/volumes.py."""
    import torch

    size, arch = cfg.augment.volume_crop_size, cfg.model.arch
    where = (f"method.name={spec.name} with model.arch={arch}, model.kwargs={cfg.model.kwargs}, "
             f"model.in_chans={cfg.model.in_chans}, augment.volume_crop_size={size}")
    try:
        with torch.device("meta"):
            model = spec.build(cfg)
            try:
                model.backbone(torch.empty(2, cfg.model.in_chans, size, size, size))
            except (RuntimeError, NotImplementedError) as exc:
                if "meta" not in str(exc):
                    raise
    except ConfigError:
        raise
    except Exception as exc:   # noqa: BLE001  MONAI raises many types for a misfit
        text = str(exc).strip().splitlines()
        reason = text[-1].strip() if text else type(exc).__name__
        raise ConfigError(f"{where} cannot work: {reason}") from None


def _check_patches(model, arch: str, size: int) -> None:
    """A ViT backbone must tile the crop exactly with its patches (timm asserts it mid-forward,
    with no message)."""
    embed = getattr(getattr(model, "backbone", None), "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if not patch:
        return
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if size % ph or size % pw:
        fit = max(ph, round(size / ph) * ph)
        raise ConfigError(f"augment.crop_size {size} is not a multiple of {arch}'s patch size "
                          f"{ph}; use e.g. augment.crop_size={fit}")
