"""Localisation scores of saliency maps where the truth is known (masks or boxes).

Pointing game (Zhang et al. 2016): a hit when the map's maximum lies inside the object
(optionally within ``tolerance`` pixels of it, Euclidean; Zhang et al. use 15 px at 224 px);
here strictly: the maximum inside must exceed the maximum outside, so a flat map (no evidence
anywhere) never scores. Energy inside the box
(Wang et al. 2020, Score-CAM's energy-based pointing game): the share of the map's total mass
that falls inside. Both are reported with a Wilson or bootstrap 95% interval over images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt, zoom


def boxes_to_masks(boxes: Sequence[Sequence[float]], shape: tuple[int, int]) -> np.ndarray:
    """Boxes ``(x0, y0, x1, y1)`` in pixels (end exclusive) -> bool masks ``[N, H, W]``."""
    masks = np.zeros((len(boxes), *shape), bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[max(0, math.floor(y0)):math.ceil(y1),
          max(0, math.floor(x0)):math.ceil(x1)] = True
    return masks


def resize_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bool masks ``[N, h, w]`` -> ``[N, *shape]`` by nearest neighbour (to the model's input)."""
    masks = np.asarray(masks, bool)
    if masks.shape[1:] == tuple(shape):
        return masks
    factors = (1, shape[0] / masks.shape[1], shape[1] / masks.shape[2])
    out = zoom(masks.astype(np.uint8), factors, order=0, grid_mode=True, mode="nearest") > 0
    return out[:, :shape[0], :shape[1]]


def _check(maps: np.ndarray, masks: np.ndarray) -> None:
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    empty = [i for i, m in enumerate(masks) if not m.any()]
    if empty:
        raise ValueError(f"masks {empty[:5]} are empty: no object to point at")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n``."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pointing_game(maps: np.ndarray, masks: np.ndarray, tolerance: int = 0) -> dict:
    """Hits of ``maps [N, H, W]`` on bool ``masks [N, H, W]``; ``{"score", "ci", "hits", "n"}``."""
    maps, masks = np.asarray(maps, np.float64), np.asarray(masks, bool)
    _check(maps, masks)
    hits = []
    for a, m in zip(maps, masks):
        inside = distance_transform_edt(~m) <= tolerance if tolerance else m
        if inside.all():
            hits.append(bool(np.ptp(a) > 0))
        else:
            hits.append(bool(a[inside].max() > a[~inside].max()))
    k = int(sum(hits))
    return {"score": k / len(hits), "ci": list(wilson(k, len(hits))), "hits": k, "n": len(hits),
            "per_image": hits}


def energy_inside(maps: np.ndarray, masks: np.ndarray, seed: int = 0) -> dict:
    """Share of each map's mass inside its mask (0 for an all-zero map); mean and bootstrap CI."""
    maps, masks = np.clip(np.asarray(maps, np.float64), 0, None), np.asarray(masks, bool)
    _check(maps, masks)
    total = maps.reshape(len(maps), -1).sum(axis=1)
    inside = (maps * masks).reshape(len(maps), -1).sum(axis=1)
    share = np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0)
    if len(share) > 1:
        rng = np.random.default_rng(seed)
        boot = share[rng.integers(0, len(share), (2000, len(share)))].mean(axis=1)
        ci = [float(v) for v in np.percentile(boot, [2.5, 97.5])]
    else:
        ci = [float(share[0])] * 2
    area = masks.reshape(len(masks), -1).mean(axis=1)
    return {"score": float(share.mean()), "ci": ci, "n": len(share),
            "chance": float(area.mean()), "per_image": [round(float(s), 4) for s in share]}
