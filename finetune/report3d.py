"""The 3-D note at the top of report.md: what a volume benchmark fed its networks."""

from __future__ import annotations

from typing import Any

from medssl.volume_models import is_volume_arch


def volume_header(cfg: Any) -> list[str]:
    """Lines for a 3-D suite (``model.arch: monai:<Net>``); none for a 2-D one."""
    if not is_volume_arch(cfg.model.arch):
        return []
    return [
        (f"**3-D benchmark.** `{cfg.model.arch}` (a MONAI network) on volumes: each init sees "
         "[1, X, Y, Z] voxel cubes, the ssl init at its published input cube, random and "
         f"monai-ssl at {cfg.input_size}³ (or the ssl init's network and cube when model.kwargs "
         "is unset), resized trilinearly; volume shards windowed in modality units first, "
         "3-D MedMNIST as uint8 / 255. ImageNet has no 3-D weights, so no imagenet row. "
         "(\"px\" below means voxels a side.)"),
        "",
    ]
