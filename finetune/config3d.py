"""What a 3-D benchmark config must hold, checked with the rest of the config before any work.

A suite is 3-D when ``model.arch`` is ``monai:<Net>`` (medssl/volume_models.py); its tasks are
then the 3-D MedMNIST flags or labeled volume shards, and ``input_size`` is the side of the
input cube in voxels. ImageNet weights have no 3-D meaning, and Grad-CAM style explanations
are 2-D only for now: both are refused here in one line rather than skipped mid-run.
"""

from __future__ import annotations

from typing import Any

from medssl.errors import ConfigError
from medssl.volume_models import is_volume_arch, net_kwargs

#: The six 3-D MedMNIST datasets (28 and 64 voxels a side; medmnist.INFO holds the rest).
MEDMNIST_3D = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
               "vesselmnist3d", "synapsemnist3d")
MEDMNIST_3D_SIZES = (28, 64)
#: Above this cube side a 3-D input is almost surely the 2-D default left in place (224³ voxels
#: is 45 MB a sample in float32).
MAX_CUBE = 160


def check_volume_config(cfg: Any) -> None:
    """Refuse a config that mixes 2-D and 3-D, or asks 3-D for what it cannot do.

    ``cfg`` is a ``finetune.config.FinetuneRunConfig`` (not imported: that module calls this
    one from its validation, and a circle would make the two one concept)."""
    volume = is_volume_arch(cfg.model.arch)
    arch = cfg.model.arch
    for task in cfg.tasks:
        if task.kind != "medmnist":
            continue   # shards: 2-D or 3-D is known from the samples (finetune/tasks.py checks)
        if (task.flag in MEDMNIST_3D) != volume:
            what = "3-D" if task.flag in MEDMNIST_3D else "2-D"
            hint = "a monai:<Net> model.arch (e.g. monai:ResNet)" if not volume else "a timm model.arch"
            raise ConfigError(f"tasks: {task.name}: {task.flag} is {what}, model.arch {arch} is not; "
                              f"use {hint}, or a separate config per dimensionality")
    monai_ssl = [i for i in cfg.init_list if i.is_monai_ssl]
    if not volume:
        if cfg.model.kwargs:
            raise ConfigError("model.kwargs is for 3-D (monai:<Net>) archs only; a timm arch takes none here")
        if monai_ssl:
            raise ConfigError(f"inits: {monai_ssl[0]} is a 3-D Swin UNETR encoder; use it with "
                              "model.arch=monai:SwinUNETR")
        return
    net_kwargs(arch, cfg.model.in_chans or 1, cfg.model.kwargs)   # names a known net, sane kwargs
    if any(i.kind == "imagenet" for i in cfg.init_list):
        raise ConfigError(f"inits: imagenet has no 3-D weights for {arch}; drop it (3-D inits: "
                          "random, ssl:DIR, monai-ssl:FILE)")
    if monai_ssl and not arch.endswith(":SwinUNETR"):
        raise ConfigError(f"inits: {monai_ssl[0]} is a Swin UNETR encoder; set model.arch=monai:SwinUNETR")
    if cfg.evaluation.explain is not None:
        raise ConfigError("evaluation.explain: explanations (Grad-CAM, occlusion) are not supported "
                          "for 3-D backbones yet; drop evaluation.explain")
    if cfg.input_size > MAX_CUBE:
        raise ConfigError(f"input_size {cfg.input_size}: for a 3-D arch it is the side of the input cube "
                          f"in voxels ({cfg.input_size}³ per sample); set e.g. input_size=64")
