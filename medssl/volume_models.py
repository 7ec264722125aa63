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


def without_channels(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` of net ``name`` without its channel count and ``spatial_dims`` (what
    ``net_kwargs`` fills in), e.g. to build the same network for other input channels."""
    return {k: v for k, v in kwargs.items() if k not in (_CHANNELS_ARG.get(name), "spatial_dims")}


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


# --- starting weights: random, a 3-D published dir, MONAI's Swin UNETR SSL file ------------


def load_volume_backbone(arch: str, in_chans: int, kwargs: dict[str, Any] | None,
                         init: Any = "random") -> tuple[VolumeBackbone, str]:
    """A ``VolumeBackbone`` with the weights ``init`` names, and where they came from in words.

    - ``random``: ``monai:<Net>`` with ``kwargs``, MONAI's own initialisation.
    - ``ssl:DIR``: a 3-D ``medssl publish`` dir (SHA256SUMS checked first); the network and its
      kwargs are config.json's, loaded strictly. ``arch``'s net must be the same network.
    - ``monai-ssl:FILE``: MONAI's self-supervised Swin UNETR weights (``model_swinvit.pt``) into
      the ``swinViT`` encoder of ``monai:SwinUNETR`` with ``kwargs`` (the released file fits
      ``feature_size=48``, one input channel); the decoder keeps its random initialisation.
    - ``imagenet``: refused; there are no ImageNet weights for a 3-D network.
    """
    from medssl.init import Init

    init = Init.parse(init)
    if init.kind == "random":
        return create_volume_backbone(arch, in_chans, kwargs), "random initialisation"
    if init.kind == "imagenet":
        raise ConfigError(f"init imagenet: there are no ImageNet weights for 3-D backbones ({arch}); "
                          "use random, ssl:DIR (3-D medssl weights) or monai-ssl:FILE")
    assert init.path is not None
    if init.kind == "ssl":
        return _from_published(arch, init.path)
    return _from_monai_ssl(arch, in_chans, kwargs, init.path)


def check_published_volume(arch: str, published: Any) -> None:
    """Refuse, in one line, 2-D weights for a 3-D arch or another network than ``arch``'s."""
    where = published.directory / "config.json"
    if not published.is_volume:
        raise ConfigError(f"{where}: 2-D weights ({published.arch}); a {arch} (3-D) benchmark needs "
                          "3-D weights published from a monai:<Net> run")
    if net_name(arch) != published.monai_net:
        raise ConfigError(f"{where}: weights are for monai:{published.monai_net}, not {arch}; "
                          f"set model.arch=monai:{published.monai_net}")


def _from_published(arch: str, directory: Any) -> tuple[VolumeBackbone, str]:
    from safetensors.torch import load_file

    from medssl.errors import MedsslError
    from medssl.published import WEIGHTS, read_published, sums_listing

    published = read_published(directory)    # SHA256SUMS checked before anything is read
    check_published_volume(arch, published)
    backbone = VolumeBackbone(published.monai_net, published.monai_kwargs)
    try:
        backbone.net.load_state_dict(load_file(str(published.weights)))   # strict
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise MedsslError(f"{published.weights}: does not fit monai:{published.monai_net}"
                          f"(**config.json kwargs): {first}") from None
    digest = sums_listing(published.directory).get(WEIGHTS, "?")
    return backbone, (f"medssl 3-D weights {published.directory.name} ({published.method or 'SSL'}, "
                      f"{published.steps if published.steps is not None else '?'} steps; "
                      f"{WEIGHTS} sha256 {digest[:16]})")


def monai_ssl_encoder_state(raw: Any, where: str) -> dict[str, torch.Tensor]:
    """MONAI's released Swin UNETR SSL checkpoint -> ``swinViT`` state-dict keys.

    The released ``model_swinvit.pt`` (MONAI research-contributions, Tang et al. 2022) is
    ``{"state_dict": {"module.patch_embed.proj.weight", "module.layers1.0.blocks.0.mlp.fc1.weight",
    ...}}`` with extra heads of the SSL objectives. ``SwinUNETR.load_from`` copies it tensor by
    tensor; the same mapping here is ``module.`` (or ``swinViT.``, a file already converted as
    MONAI's tutorial does) -> the encoder's own key, and the timm-style ``mlp.fc1``/``mlp.fc2``
    -> MONAI's ``mlp.linear1``/``mlp.linear2``. Keys of the SSL heads are returned too; the
    caller keeps those the encoder has.
    """
    from medssl.errors import MedsslError

    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedsslError(f"{where}: not MONAI Swin UNETR SSL weights (expected a torch file holding "
                          "a 'state_dict' of tensors, as model_swinvit.pt)")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = str(key)
        for prefix in ("module.", "swinViT."):
            name = name.removeprefix(prefix)
        name = name.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        out[name] = value
    return out


def _from_monai_ssl(arch: str, in_chans: int, kwargs: dict[str, Any] | None,
                    path: Any) -> tuple[VolumeBackbone, str]:
    from pathlib import Path

    from medssl.errors import MedsslError
    from medssl.io import sha256_file

    where = f"monai-ssl:{path}"
    if net_name(arch) != "SwinUNETR":
        raise ConfigError(f"init {where}: MONAI's SSL weights are a Swin UNETR encoder; set "
                          f"model.arch=monai:SwinUNETR (not {arch})")
    path = Path(path)
    if not path.is_file():
        raise MedsslError(f"init {where}: file not found (MONAI's model_swinvit.pt, downloaded by hand)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not weights-only loadable: refuse, never unpickle
        raise MedsslError(f"{path}: cannot load as a weights-only torch file ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    found = monai_ssl_encoder_state(raw, str(path))
    backbone = create_volume_backbone(arch, in_chans, kwargs)
    encoder = backbone.net.swinViT
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in found]
    if missing:
        raise MedsslError(f"{path}: {len(missing)} of {len(expected)} Swin UNETR encoder tensors "
                          f"are not in the file (first: swinViT.{missing[0]}); is it MONAI's "
                          "model_swinvit.pt, and use_v2 off?")
    wrong = [(k, tuple(found[k].shape), tuple(v.shape)) for k, v in expected.items()
             if tuple(found[k].shape) != tuple(v.shape)]
    if wrong:
        key, got, want = wrong[0]
        raise MedsslError(f"{path}: swinViT.{key} is {list(got)} in the file, {list(want)} in "
                          f"monai:SwinUNETR with {backbone.net_kwargs}; the released weights need "
                          "model.kwargs.feature_size=48 and model.in_chans=1")
    encoder.load_state_dict({k: found[k] for k in expected}, strict=True)
    return backbone, (f"MONAI Swin UNETR SSL weights {path.name} (sha256 {sha256_file(path)[:16]}; "
                      "encoder only)")
