"""The 3-D half of ``medssl publish``: a ``monai:<Net>`` run's backbone -> plain MONAI weights.

A 3-D pretraining checkpoint holds the ``VolumeBackbone`` (medssl/volume_models.py) under the
backbone prefix, so its keys are ``backbone.net.<MONAI key>``. Publishing strips both prefixes
and loads the tensors strictly into a fresh ``monai.networks.nets.<Net>(**kwargs)`` built from
the run record's arch and kwargs: what is written is exactly what that one line loads back,
and a checkpoint that does not fit the recorded network is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medssl.errors import MedsslError
from medssl.rundir import RunRecord, record_path
from medssl.volume_models import VolumeBackbone, create_volume_backbone

#: The VolumeBackbone's own attribute holding the MONAI network.
NET_PREFIX = "net."


def volume_backbone(record: RunRecord, state: dict[str, Any], ckpt_path: Path) -> VolumeBackbone:
    """The recorded ``monai:<Net>`` with the checkpoint's backbone tensors ``state``
    (``net.<MONAI key>``), loaded strictly; MedsslError naming the file when they do not fit."""
    try:
        backbone = create_volume_backbone(record.arch, record.in_chans, record.model_kwargs)
    except MedsslError as exc:
        raise MedsslError(f"{record_path(ckpt_path.parent.parent)}: {exc}") from None
    net_state = {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    if not net_state:
        raise MedsslError(f"{ckpt_path}: no backbone key starts with {NET_PREFIX!r}; not a "
                          f"{record.arch} checkpoint")
    try:
        result = backbone.net.load_state_dict(net_state, strict=False)
    except RuntimeError as exc:   # a shape mismatch: kwargs or channels differ from the weights
        first = str(exc).strip().splitlines()[-1].strip()
        raise MedsslError(f"{ckpt_path}: backbone weights do not fit {record.arch} with kwargs "
                          f"{backbone.net_kwargs}: {first}") from None
    if result.missing_keys or result.unexpected_keys:
        bad = result.missing_keys[:3] or result.unexpected_keys[:3]
        raise MedsslError(f"{ckpt_path}: backbone weights do not fit {record.arch}: "
                          f"{'missing' if result.missing_keys else 'unexpected'} {bad}")
    return backbone


def net_tensors(backbone: VolumeBackbone) -> dict[str, torch.Tensor]:
    """The MONAI network's state dict, contiguous on the CPU (what ``model.safetensors`` holds)."""
    return {k: v.detach().cpu().contiguous() for k, v in backbone.net_state_dict().items()}


def input_cube(record: RunRecord) -> tuple[int, int, int]:
    """The network input ``(X, Y, Z)`` voxels: the run's crop size (an int for a cube)."""
    size: Any = record.input_size
    if isinstance(size, (list, tuple)):
        if len(size) != 3:
            raise MedsslError(f"{record_path('.')}: input_size {size} is not a side or [X, Y, Z]")
        return tuple(int(v) for v in size)  # type: ignore[return-value]
    return (int(size),) * 3


def shard_spacing(index: dict | None, record: RunRecord) -> list[float] | None:
    """The voxel size (mm, RAS) the training shards were resampled to, when recorded: the shard
    index's ``config.spacing`` (``medssl shard --volumes --spacing``), else the run config's
    ``data.spacing``; None when neither says."""
    for source in ((index or {}).get("config") or {}, record.config.get("data") or {}):
        spacing = source.get("spacing") if isinstance(source, dict) else None
        if isinstance(spacing, str):
            spacing = spacing.split(",")
        if isinstance(spacing, (list, tuple)) and len(spacing) == 3:
            try:
                return [float(v) for v in spacing]
            except (TypeError, ValueError):
                return None
    return None
