"""3-D backbones from MONAI, chosen by name: ``model.arch: monai:<Net>`` plus ``model.kwargs``.

The 3-D counterpart of ``medssl.models`` (timm, 2-D). A ``VolumeBackbone`` holds one
``monai.networks.nets.<Net>(**kwargs)`` as ``net`` and maps ``[B, C, X, Y, Z]`` to pooled
features ``[B, num_features]``. ``net`` is the whole MONAI network, unchanged, so its
``state_dict()`` is what ``medssl publish`` writes and what
``monai.networks.nets.<Net>(**kwargs).load_state_dict(safetensors.torch.load_file(...))``
loads back; ``net_kwargs`` are exactly those kwargs (``spatial_dims=3`` and the channel count
filled in).

Networks and their feature path (why each is pooled where it is):
- ``ResNet``: built with ``feed_forward=False``, which is MONAI's own "no classifier" switch;
  its output is the global-average-pooled last stage.
- ``DenseNet``: ``features`` then the ReLU/pool/flatten of ``class_layers`` (the final linear
  layer is left out of the path and frozen: it needs an ``out_channels`` to exist at all).
- ``SwinUNETR``: the Swin encoder (``swinViT``) only, its deepest stage averaged; the U-Net
  decoder is kept in ``net`` (so the weights load into ``SwinUNETR(**kwargs)`` strictly, as
  MONAI's own SSL weights are used) but frozen, since no 3-D SSL objective here trains it.
- ``ViT``: ``classification=False``, tokens averaged.
- ``MaskedAutoEncoderViT``: the encoder (patch embedding, class token, blocks) without
  masking, patch tokens averaged; the MAE method trains the decoder through ``net`` itself
  (``features_only=False``), fine-tuning freezes it.

MONAI transformer blocks also carry a cross-attention norm they never use; it is frozen too.
Frozen parameters have ``requires_grad=False`` so DDP, which only tracks trainable ones, never
waits for a gradient the feature path cannot produce.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medssl.errors import ConfigError

MONAI_PREFIX = "monai:"

#: Net name -> the keyword its input channel count goes in.
_CHANNELS_ARG = {
    "ResNet": "n_input_channels",
    "DenseNet": "in_channels",
    "SwinUNETR": "in_channels",
    "ViT": "in_channels",
    "MaskedAutoEncoderViT": "in_channels",
}
#: Kwargs each net must be built with for a feature extractor (and why, in the docstring).
_FORCED = {
    "ResNet": {"feed_forward": False},
    "ViT": {"classification": False},
}
#: Kwargs a net requires that mean nothing for features: filled in when the config omits them.
_DEFAULTS = {
    "DenseNet": {"out_channels": 1},
    "SwinUNETR": {"out_channels": 1},
}
VOLUME_NETS = tuple(_CHANNELS_ARG)


def is_volume_arch(arch: str) -> bool:
    """True for ``monai:<Net>`` archs (3-D), False for timm names (2-D)."""
    return str(arch).startswith(MONAI_PREFIX)


def net_name(arch: str) -> str:
    """``monai:ResNet`` -> ``ResNet``; ConfigError naming the choices for anything else."""
    name = str(arch)[len(MONAI_PREFIX):] if is_volume_arch(arch) else str(arch)
    if name not in _CHANNELS_ARG:
        raise ConfigError(f"model.arch {arch!r}: 3-D backbones are monai:<Net> with Net one of "
                          f"{', '.join(VOLUME_NETS)}")
    return name


def net_kwargs(arch: str, in_chans: int, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The complete ``monai.networks.nets.<Net>`` kwargs: the config's, ``spatial_dims=3``, the
    channel count and the feature-extractor switches (a config contradicting one is refused)."""
    name = net_name(arch)
    out = dict(_DEFAULTS.get(name, {}))
    out.update(kwargs or {})
    channels = _CHANNELS_ARG[name]
    if channels in out and int(out[channels]) != int(in_chans):
        raise ConfigError(f"model.kwargs.{channels}={out[channels]} contradicts "
                          f"model.in_chans={in_chans}; set model.in_chans only")
    if int(out.get("spatial_dims", 3)) != 3:
        raise ConfigError(f"model.kwargs.spatial_dims={out['spatial_dims']}: volume backbones "
                          "are 3-D (use a timm model.arch for 2-D)")
    for key, value in _FORCED.get(name, {}).items():
        if key in out and out[key] != value:
            raise ConfigError(f"model.kwargs.{key}={out[key]!r}: a monai:{name} backbone needs "
                              f"{key}={value!r} (medssl adds its own heads)")
        out[key] = value
    out[channels] = int(in_chans)
    out["spatial_dims"] = 3
    return dict(sorted(out.items()))


class VolumeBackbone(nn.Module):
    """A MONAI network as a feature extractor: ``[B, C, X, Y, Z]`` -> ``[B, num_features]``."""

    def __init__(self, name: str, kwargs: dict[str, Any], features_only: bool = True):
        super().__init__()
        from monai.networks import nets

        self.net_name = name
        self.net_kwargs = dict(kwargs)
        try:
            self.net = getattr(nets, name)(**kwargs)
        except (TypeError, ValueError) as exc:
            # MONAI's own words: a missing or bad argument, a size its patches do not divide.
            raise ConfigError(f"model.arch monai:{name}: {exc}") from None
        self.num_features = _num_features(name, self.net, kwargs)
        used = {id(p) for p in _feature_params(name, self.net)} if features_only else None
        for pname, p in self.net.named_parameters():
            # MONAI's TransformerBlock builds a cross-attention norm even when cross-attention
            # is off; it is never in any forward pass.
            if (used is not None and id(p) not in used) or "cross_attn" in pname:
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        if self.net_name == "ResNet":
            return net(x)
        if self.net_name == "DenseNet":
            return net.class_layers[:-1](net.features(x))
        if self.net_name == "SwinUNETR":
            deepest = net.swinViT(x, net.normalize)[-1]
            return deepest.mean(dim=(2, 3, 4))
        if self.net_name == "ViT":
            return net(x)[0].mean(dim=1)
        # MaskedAutoEncoderViT: its encoder without the random masking.
        tokens = net.patch_embedding(x)
        tokens = torch.cat([net.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return net.blocks(tokens)[:, 1:].mean(dim=1)

    def net_state_dict(self) -> dict[str, torch.Tensor]:
        """The MONAI network's own state dict (no ``net.`` prefix): what publish writes."""
        return self.net.state_dict()


def _feature_params(name: str, net: nn.Module) -> list[nn.Parameter]:
    if name == "DenseNet":
        return list(net.features.parameters())
    if name == "SwinUNETR":
        return list(net.swinViT.parameters())
    if name == "MaskedAutoEncoderViT":
        return [net.cls_token, *net.patch_embedding.parameters(), *net.blocks.parameters()]
    return list(net.parameters())


def _num_features(name: str, net: nn.Module, kwargs: dict[str, Any]) -> int:
    if name == "ResNet":
        convs = [m for m in net.layer4.modules() if isinstance(m, nn.Conv3d)]
        return int(convs[-1].out_channels)
    if name == "DenseNet":
        return int(net.class_layers.out.in_features)
    if name == "SwinUNETR":
        return 16 * int(kwargs.get("feature_size", 24))
    return int(kwargs.get("hidden_size", 768))


def create_volume_backbone(arch: str, in_chans: int, kwargs: dict[str, Any] | None = None,
                           features_only: bool = True) -> VolumeBackbone:
    """A randomly initialised ``VolumeBackbone`` for ``model.arch`` (``monai:<Net>``)."""
    name = net_name(arch)
    return VolumeBackbone(name, net_kwargs(arch, in_chans, kwargs), features_only=features_only)
