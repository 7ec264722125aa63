"""The 3-D side of the task loader: volumes held at their stored dtype, shrunk on the way in.

3-D MedMNIST (``organmnist3d`` ... at 28 or 64 voxels a side) is read by medmnist's own dataset
classes like the 2-D flags (finetune/tasks.py) and held as uint8 ``[N, 1, X, Y, Z]``. A labeled
volume shard sample (``vol.npy.gz``, medssl/sample.py) is uint16 ``[1, X, Y, Z]`` in RAS order
at the shards' voxel size; volumes larger than the largest input cube any init needs are
resized to it trilinearly when loaded (the stored -> modality map is affine, so resizing before
windowing equals resizing after it up to the clip at the window edges), so a task holds
N x side³ x 2 bytes, not its full-resolution volumes.
"""

from __future__ import annotations

import numpy as np


def shrink_volume(volume: np.ndarray, side: int | None) -> np.ndarray:
    """``[C, X, Y, Z]`` uint8/uint16 -> at most ``side`` voxels along each axis, same dtype,
    aspect kept (the longest axis becomes ``side``), when larger."""
    if side is None or max(volume.shape[1:]) <= side:
        return volume
    import torch
    import torch.nn.functional as F

    scale = side / max(volume.shape[1:])
    size = tuple(max(1, round(n * scale)) for n in volume.shape[1:])
    t = torch.from_numpy(volume.astype(np.float32))[None]
    t = F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0]
    info = np.iinfo(volume.dtype)
    return t.round().clamp(info.min, info.max).numpy().astype(volume.dtype)


def medmnist_volumes(imgs: np.ndarray) -> np.ndarray:
    """medmnist's 3-D ``imgs`` (uint8 ``[N, X, Y, Z]``, or ``[N, X, Y, Z, C]``) -> ``[N, C, X, Y, Z]``."""
    imgs = np.asarray(imgs)
    if imgs.ndim == 4:
        return imgs[:, None]
    return np.ascontiguousarray(np.moveaxis(imgs, -1, 1))
