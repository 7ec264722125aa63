"""Initialisation sources of a 3-D suite (``model.arch: monai:<Net>``): random, ``ssl:DIR`` and
``monai-ssl:FILE``, all the same MONAI network so a comparison differs only in the weights.

The suite's network (``VolumeSuite``): ``model.kwargs`` when given; else the first ssl init's
(its config.json), so random weights are drawn for exactly the network the SSL weights
belong to, at the cube it was trained at; else MONAI's defaults at ``input_size`` voxels a
side. Each init's input recipe:

- ssl:DIR: its published channels, mean/std, window and input cube (``config.json`` -> input).
- random: ``[0, 1]`` inputs as they are (mean 0, std 1), the suite's cube.
- monai-ssl:FILE: ``[0, 1]`` inputs (MONAI's Swin UNETR SSL pipeline scales CT to [0, 1] and
  does not normalise further), the suite's cube; the weights fill the encoder only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from finetune.inits import InitSource
from medssl.errors import MedsslError
from medssl.init import Init
from medssl.volume_models import (
    check_published_volume,
    is_volume_arch,
    load_volume_backbone,
    net_kwargs,
    net_name,
    without_channels,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeSuite:
    """The network every init of a 3-D suite is built as, and the random init's input cube."""

    arch: str
    kwargs: dict[str, Any]               # without channels (those are each init's)
    cube: tuple[int, int, int]           # (X, Y, Z) voxels
    #: Largest cube any init needs: volume shards are shrunk to it on load.
    max_side: int


def volume_suite(cfg: Any) -> VolumeSuite:
    """Resolve (and check, in one line each) the suite's network from ``cfg`` (a
    FinetuneRunConfig with a monai: arch). Reads the ssl inits' config.json (sums checked)."""
    from medssl.published import read_published

    arch = cfg.model.arch
    published = []
    for init in cfg.init_list:
        if init.is_ssl:
            pub = read_published(init.path)
            check_published_volume(arch, pub)
            published.append(pub)
    if cfg.model.kwargs is None and published:
        first = published[0]
        kwargs = without_channels(first.monai_net, first.monai_kwargs)
        cube = tuple(int(v) for v in first.input_size[1:])
    else:
        kwargs = dict(cfg.model.kwargs or {})
        cube = (int(cfg.input_size),) * 3
    name = net_name(arch)
    chans = cfg.model.in_chans or 1
    for pub in published:
        if without_channels(name, pub.monai_kwargs) != without_channels(name, net_kwargs(arch, chans, kwargs)):
            log.warning("%s: built with its own config.json kwargs, which differ from model.kwargs; "
                        "random weights are another network", pub.directory.name)
    sides = [max(cube)] + [max(p.input_size[1:]) for p in published]
    return VolumeSuite(arch=arch, kwargs=kwargs, cube=cube, max_side=max(sides))  # type: ignore[arg-type]


def check_volume_inits(cfg: Any) -> None:
    """Preflight: 3-D weights only in a 3-D suite and 2-D only in a 2-D one; the 3-D suite
    resolves."""
    from medssl.published import read_published

    if is_volume_arch(cfg.model.arch):
        suite = volume_suite(cfg)
        if any(not i.is_ssl for i in cfg.init_list):
            # Bad kwargs (a ResNet without layers, a cube a ViT was not built for) fail here,
            # before any task is loaded, not at the first random cell.
            from medssl.volume_models import create_volume_backbone

            create_volume_backbone(suite.arch, cfg.model.in_chans or 1, suite.kwargs)
        return
    for init in cfg.init_list:
        if init.is_ssl:
            pub = read_published(init.path)
            if pub.is_volume:
                raise MedsslError(f"{pub.directory / 'config.json'}: 3-D weights ({pub.arch}); a 2-D "
                                  f"benchmark ({cfg.model.arch}) needs 2-D weights; set "
                                  f"model.arch={pub.arch} with 3-D tasks")


def load_volume_init(init: Init, suite: VolumeSuite, data_channels: int,
                     in_chans: int | None) -> InitSource:
    """Build the init's backbone once (checking the weights) and derive its input recipe."""
    window = None
    if init.is_ssl:
        from medssl.published import read_published

        pub = read_published(init.path)
        chans, mean, std, window = pub.in_chans, pub.mean, pub.std, pub.window
        cube = tuple(int(v) for v in pub.input_size[1:])
    else:
        chans = in_chans or data_channels
        mean, std, cube = (0.0,) * chans, (1.0,) * chans, suite.cube

    def make():
        return load_volume_backbone(suite.arch, chans, suite.kwargs, init)[0]

    make()   # fail here, once, on weights that do not load
    return InitSource(init=init, label=init.label, in_chans=chans, mean=tuple(mean), std=tuple(std),
                      window=window, make=make, input_size=cube, spatial_dims=3)  # type: ignore[arg-type]
