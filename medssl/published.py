"""The published dir contract: what ``medssl publish`` writes and everyone else reads.

A published dir holds ``model.safetensors`` (the timm backbone, ``num_classes=0``),
``config.json`` in timm's hub layout, ``README.md`` (the model card) and ``SHA256SUMS``
(written last, so a publish that died half-way never verifies).

``config.json``: ``architecture``, ``num_classes``, ``num_features``, ``model_args`` (the
``timm.create_model`` kwargs the weights need, ``in_chans`` among them) and ``pretrained_cfg``
holding only keys timm's ``PretrainedCfg`` knows, so that plain timm loads the folder as
``timm.create_model("local-dir:DIR", pretrained=True)`` -- the same code path as
``hf-hub:ORG/NAME`` for a pushed copy. medssl's own facts (modality, window, intensity
pipeline, method, steps, provenance digests) sit in the sibling ``medssl`` key, which timm
ignores. ``read_published`` is the one reader: finetune's inits and the backbone factory use it.

3-D weights (``model.arch: monai:<Net>``, medssl/volume_models.py) have no timm layout:
``model.safetensors`` holds the plain MONAI network's state dict and ``config.json`` names the
network and its complete constructor kwargs, so that
``monai.networks.nets.<Net>(**config["monai"]["kwargs"]).load_state_dict(load_file(...))``
loads it strictly::

    {"architecture": "monai:ResNet", "num_features": 512,
     "monai": {"net": "ResNet", "kwargs": {...}, "version": "1.6.1"},
     "input": {"in_chans": 1, "input_size": [C, X, Y, Z], "mean": [...], "std": [...],
               "interpolation": "trilinear", "axes": "RAS"},
     "medssl": {"spatial_dims": 3, "spacing": [x, y, z] mm or null, ...the 2-D block's keys}}

There is no ``pretrained_cfg`` (timm's ``local-dir:`` loading does not apply); the reader tells
the two layouts apart by ``medssl.spatial_dims``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError
from medssl.io import atomic_write_text, sha256_file

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
SUMS = "SHA256SUMS"
#: Keyed hashes of the pretraining patients (medssl/leakage/patients.py), when publish could
#: read the shard folders pretraining read; listed in SHA256SUMS like the rest.
PATIENTS = "pretraining_patients.json"
PUBLISHED_FILES = (WEIGHTS, CONFIG, CARD, PATIENTS, SUMS)


@dataclass
class Published:
    """What a published dir says about its weights (``config.json``, checked against SHA256SUMS)."""

    directory: Path
    arch: str                              # timm name, or monai:<Net> for 3-D weights
    num_features: int
    model_args: dict[str, Any]             # timm.create_model kwargs (in_chans, img_size, ...)
    in_chans: int
    input_size: tuple[int, ...]            # (C, H, W), or (C, X, Y, Z) for 3-D weights
    mean: tuple[float, ...]                # per channel, on [0, 1] inputs
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    modality: str | None = None
    window: tuple[float, float] | None = None   # (center, width) in modality units
    intensity: str | None = None           # the input pipeline, in words
    method: str | None = None
    steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # the rest of the "medssl" block
    spatial_dims: int = 2
    monai_net: str | None = None           # 3-D: monai.networks.nets.<monai_net>
    monai_kwargs: dict[str, Any] = field(default_factory=dict)   # 3-D: its complete kwargs
    spacing: tuple[float, float, float] | None = None   # 3-D: voxel size (mm) of the shards, RAS

    @property
    def weights(self) -> Path:
        return self.directory / WEIGHTS

    @property
    def is_volume(self) -> bool:
        return self.spatial_dims == 3

    def timm_overlay(self) -> dict[str, Any]:
        """``pretrained_cfg_overlay`` for ``timm.create_model(arch, pretrained=True, ...)``."""
        if self.is_volume:
            raise MedsslError(f"{self.directory}: 3-D weights ({self.arch}) are a MONAI network, "
                              "not a timm model; use a monai:<Net> model.arch")
        return {"file": str(self.weights), "input_size": self.input_size, "mean": self.mean,
                "std": self.std, "interpolation": self.interpolation, "crop_pct": self.crop_pct}


def hub_config(model: Any, arch: str, in_chans: int, size: int, mean: list[float], std: list[float],
               license_: str, model_args: dict[str, Any], method: str,
               medssl_block: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for ``model`` (a timm backbone): timm keys in ``pretrained_cfg``, ours in
    ``medssl``.

    Written by hand rather than with timm's ``save_config_for_hf``: its signature differs across
    the timm>=1.0 range we support, and it copies the architecture's ImageNet tag, licence and
    paper into pretrained_cfg, which would misdescribe these weights.
    """
    base = model.pretrained_cfg
    pretrained_cfg = {
        "tag": f"medssl_{method}",
        "custom_load": False,
        "input_size": [in_chans, size, size],
        "fixed_input_size": bool(base.get("fixed_input_size", False)),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": mean,
        "std": std,
        "num_classes": 0,
        "first_conv": base.get("first_conv"),
        "classifier": base.get("classifier"),
        "license": license_,
    }
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "model_args": {"in_chans": in_chans, **model_args, "num_classes": 0},
        "pretrained_cfg": pretrained_cfg,
        "medssl": {"method": method, **medssl_block},
    }
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    return config


def read_published(directory: str | Path) -> Published:
    """Verify ``directory`` against its SHA256SUMS, then read its ``config.json``."""
    directory = Path(directory).expanduser()
    verify_published(directory)
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text())
        if int((config.get("medssl") or {}).get("spatial_dims", 2)) == 3:
            return _read_volume(directory, config)
        pcfg = config["pretrained_cfg"]
        ours = dict(config.get("medssl") or {})
        model_args = dict(config.get("model_args") or {})
        input_size = tuple(int(v) for v in pcfg.get("input_size", (3, 224, 224)))
        in_chans = int(model_args.get("in_chans", input_size[0]))
        window = ours.pop("window", None)
        return Published(
            directory=directory, arch=str(config["architecture"]),
            num_features=int(config.get("num_features") or 0), model_args=model_args,
            in_chans=in_chans, input_size=(in_chans, *input_size[1:]),
            mean=tuple(float(v) for v in pcfg["mean"]), std=tuple(float(v) for v in pcfg["std"]),
            interpolation=str(pcfg.get("interpolation", "bicubic")),
            crop_pct=float(pcfg.get("crop_pct", 1.0)),
            modality=ours.pop("modality", None),
            window=(float(window["center"]), float(window["width"])) if window else None,
            intensity=ours.pop("intensity", None), method=ours.pop("method", None),
            steps=ours.pop("steps", None), extra=ours,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MedsslError(f"{path}: not a medssl published config ({type(exc).__name__}: {exc})") from None


def volume_config(arch: str, net: str, kwargs: dict[str, Any], num_features: int, in_chans: int,
                  cube: tuple[int, int, int], mean: list[float], std: list[float], license_: str,
                  method: str, spacing: list[float] | None,
                  medssl_block: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of 3-D weights (the layout in the module docstring)."""
    import monai

    return {
        "architecture": arch,
        "num_features": int(num_features),
        "license": license_,
        "monai": {"net": net, "kwargs": kwargs, "version": monai.__version__},
        "input": {"in_chans": int(in_chans), "input_size": [int(in_chans), *map(int, cube)],
                  "mean": mean, "std": std, "interpolation": "trilinear", "axes": "RAS"},
        "medssl": {"method": method, "spatial_dims": 3,
                   "spacing": [float(v) for v in spacing] if spacing else None, **medssl_block},
    }


def _read_volume(directory: Path, config: dict[str, Any]) -> Published:
    ours = dict(config.get("medssl") or {})
    monai_block, inp = config["monai"], config["input"]
    input_size = tuple(int(v) for v in inp["input_size"])
    if len(input_size) != 4:
        raise ValueError(f"input.input_size {list(input_size)} is not [C, X, Y, Z]")
    window = ours.pop("window", None)
    spacing = ours.pop("spacing", None)
    ours.pop("spatial_dims", None)
    return Published(
        directory=directory, arch=str(config["architecture"]),
        num_features=int(config.get("num_features") or 0), model_args={},
        in_chans=int(inp.get("in_chans", input_size[0])), input_size=input_size,
        mean=tuple(float(v) for v in inp["mean"]), std=tuple(float(v) for v in inp["std"]),
        interpolation=str(inp.get("interpolation", "trilinear")), crop_pct=1.0,
        modality=ours.pop("modality", None),
        window=(float(window["center"]), float(window["width"])) if window else None,
        intensity=ours.pop("intensity", None), method=ours.pop("method", None),
        steps=ours.pop("steps", None), extra=ours, spatial_dims=3,
        monai_net=str(monai_block["net"]), monai_kwargs=dict(monai_block["kwargs"]),
        spacing=tuple(float(v) for v in spacing) if spacing else None,
    )


def verify_published(directory: Path) -> None:
    """Check a published dir against its SHA256SUMS; raise MedsslError naming the bad file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MedsslError(f"{directory}: published dir not found")
    listed = sums_listing(directory)
    sums_path = directory / SUMS
    for required in (WEIGHTS, CONFIG):
        if required not in listed:
            raise MedsslError(f"{sums_path}: does not list {required}; the dir cannot be trusted")
    for name, expected in listed.items():
        path = directory / name
        if not path.is_file():
            raise MedsslError(f"{path}: listed in {SUMS} but missing")
        if sha256_file(path) != expected:
            raise MedsslError(f"{path}: sha256 does not match {SUMS}; the file was changed or damaged")


def sums_listing(directory: Path) -> dict[str, str]:
    """File name -> sha256 as ``SHA256SUMS`` lists them (not checked against the files)."""
    sums_path = Path(directory) / SUMS
    if not sums_path.is_file():
        raise MedsslError(f"{sums_path}: missing; not a complete medssl publish (re-run medssl publish)")
    listed: dict[str, str] = {}
    for n, line in enumerate(sums_path.read_text().splitlines(), 1):
        match = re.fullmatch(r"([0-9a-f]{64}) [ *]([^/\\]+)", line.strip())
        if not match or match.group(2) in (".", ".."):
            raise MedsslError(f"{sums_path}: line {n} is not '<sha256>  <file name>'")
        listed[match.group(2)] = match.group(1)
    return listed


def write_sums(directory: Path, names: list[str]) -> None:
    """Write ``SHA256SUMS`` (``sha256sum -c`` format) for ``names`` in ``directory``."""
    lines = "".join(f"{sha256_file(directory / name)}  {name}\n" for name in sorted(names))
    atomic_write_text(directory / SUMS, lines)
