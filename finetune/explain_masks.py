"""Where the findings are, per shard sample: the ground truth of the localisation score.

``evaluation.explain.masks`` names one file, read here and nowhere else, giving for a shard
sample KEY (the pseudonymous ``__key__`` of the task's shards) the pixels of its finding:

- ``.npz``: one 2-D array per key (``np.savez(path, **{key: mask})``), nonzero inside; any
  resolution that covers the whole stored image (it is resized to the network input, as the
  image is).
- ``.csv``: columns ``key,x0,y0,x1,y1,width,height``: a box in pixels (end exclusive) of an
  image ``width`` x ``height``; several rows of one key are united. A row with empty box
  columns states "no finding" for that key.

A key the file does not name is not scored (and counted); an empty mask is an image without a
finding. Masks never enter shards: they sit beside the data they describe, and the join from a
sample to its mask is by key only.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.explain.localisation import boxes_to_masks, resize_masks
from medssl.errors import MedsslError

_BOX = ("x0", "y0", "x1", "y1", "width", "height")


@dataclass
class MaskSource:
    """Finding masks by sample key, at their own resolution (``[h, w]`` bool)."""

    masks: dict[str, np.ndarray]
    path: str

    def __len__(self) -> int:
        return len(self.masks)

    def for_keys(self, keys: Sequence[str], shape: tuple[int, int]) -> tuple[np.ndarray, int]:
        """``[N, *shape]`` bool masks for ``keys`` (empty where unknown), and how many were unknown."""
        out = np.zeros((len(keys), *shape), bool)
        missing = 0
        for i, key in enumerate(keys):
            mask = self.masks.get(key)
            if mask is None:
                missing += 1
            elif mask.any():
                out[i] = resize_masks(mask[None], shape)[0]
        return out, missing


def load_masks(path: str | Path) -> MaskSource:
    """Read a masks file (see the module docstring); MedsslError naming it when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MedsslError(f"evaluation.explain.masks: {path} not found")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                masks = {k: np.asarray(data[k]) != 0 for k in data.files}
            bad = [k for k, m in masks.items() if m.ndim != 2]
            if bad:
                raise ValueError(f"mask {bad[0]!r} is not 2-D")
        elif path.suffix == ".csv":
            masks = _from_csv(path)
        else:
            raise ValueError("expected a .npz of masks or a .csv of boxes")
    except (OSError, ValueError, KeyError) as exc:
        raise MedsslError(f"evaluation.explain.masks: {path}: {exc}") from None
    return MaskSource(masks, str(path))


def _from_csv(path: Path) -> dict[str, np.ndarray]:
    masks: dict[str, np.ndarray] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("key", *_BOX) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"missing column(s) {missing}; need key,{','.join(_BOX)}")
        for n, row in enumerate(reader, start=2):
            key = (row["key"] or "").strip()
            if not key:
                raise ValueError(f"line {n}: empty key")
            if not any((row[c] or "").strip() for c in _BOX[:4]):
                masks.setdefault(key, np.zeros((1, 1), bool))
                continue
            try:
                x0, y0, x1, y1, w, h = (float(row[c]) for c in _BOX)
            except (TypeError, ValueError):
                raise ValueError(f"line {n}: box and size must be numbers") from None
            if w < 1 or h < 1 or not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise ValueError(f"line {n}: box ({x0}, {y0}, {x1}, {y1}) is not inside {w} x {h}")
            box = boxes_to_masks([(x0, y0, x1, y1)], (int(h), int(w)))[0]
            prev = masks.get(key)
            if prev is not None and prev.shape == box.shape:
                box |= prev
            elif prev is not None and prev.any():
                raise ValueError(f"line {n}: key {key!r} has boxes on images of different sizes")
            masks[key] = box
    return masks
