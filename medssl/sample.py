"""The shard sample contract, reading side: one module turns a stored sample into typed values.

A shard sample (ARCHITECTURE.md section 3) is ``img.png`` (16-bit grayscale or 8-bit RGB)
-- or, in a volume shard (``medssl shard --volumes``), ``vol.npy.gz`` (uint16 ``[X, Y, Z]``,
RAS axes, voxel size in ``spacing``) -- plus an allow-listed ``json`` and, for single-integer
labels, ``cls``. Pretraining's loader,
fine-tuning's task loader and the leakage and explanation tools all read samples through
``read_sample``, and every consumer maps stored values to display units through the one
``window_to_unit``, so the stages agree on intensities without importing each other.
The writing side (the allow-list, intensity encoding, PNG encoding) is ``medssl.data.sample``.

Intensity encoding: a stored grayscale value ``s`` is ``s * slope + offset`` in modality units
(HU for CT). The window ``(center, width)`` is in modality units; a sample without one is
shown min..max.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medssl.data.sample import VOLUME_MEMBER, decode_image, decode_volume


@dataclass
class ShardSample:
    """One decoded sample. ``image`` is ``[C, H, W]`` as stored: uint16 grayscale (C = 1) or
    uint8 RGB (C = 3); for a volume, uint16 ``[1, X, Y, Z]`` (RAS) with ``spacing`` in mm. Pseudonyms (``patient``, ``study``, ``series``) are the writer's salted
    HMACs; nothing here identifies a person."""

    key: str
    image: np.ndarray
    patient: str | None = None
    study: str | None = None
    series: str | None = None
    offset: float = 0.0                    # modality value of stored 0
    slope: float = 1.0                     # modality units per stored step
    unit: str | None = None                # "HU" for CT, else None
    window: tuple[float, float] | None = None   # (center, width) in modality units
    label: int | list[int] | None = None
    attributes: dict[str, str] = field(default_factory=dict)   # categorical, de-identified
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    pixel_spacing: tuple[float, float] | None = None   # (row, column) mm
    slice_index: int | None = None
    split: str | None = None               # from the shard's name, when known
    spacing: tuple[float, float, float] | None = None   # volumes: RAS voxel size, mm

    @property
    def is_volume(self) -> bool:
        return self.image.ndim == 4

    @property
    def channels(self) -> int:
        return int(self.image.shape[0])

    def modality_units(self) -> np.ndarray:
        """Grayscale image in modality units, float32 ``[1, H, W]`` or ``[1, X, Y, Z]`` (RGB: a
    float copy)."""
        if self.image.dtype == np.uint8:
            return self.image.astype(np.float32)
        return self.image.astype(np.float32) * np.float32(self.slope) + np.float32(self.offset)


def read_sample(raw: dict[str, Any]) -> ShardSample:
    """A WebDataset raw sample (member name -> bytes, plus ``__key__``/``__url__``) -> ShardSample.

    Raises ``KeyError``/``ValueError`` on a malformed sample; callers count such errors.
    """
    meta = json.loads(raw["json"])
    if VOLUME_MEMBER in raw:
        image = decode_volume(raw[VOLUME_MEMBER])
    else:
        image = decode_image(raw["img.png"] if "img.png" in raw else raw["png"])
    label = meta.get("label")
    if label is None and "cls" in raw:
        label = int(raw["cls"])
    intensity = meta.get("intensity") or {}
    window = meta.get("window") or {}
    has_window = window.get("center") is not None and window.get("width") is not None
    spacing = meta.get("pixel_spacing")
    voxels = meta.get("spacing")
    url = str(raw.get("__url__") or "")
    name = url.rsplit("/", 1)[-1]
    return ShardSample(
        key=str(raw.get("__key__", "")),
        image=image,
        patient=meta.get("patient"),
        study=meta.get("study"),
        series=meta.get("series"),
        offset=float(intensity.get("offset", 0.0)),
        slope=float(intensity.get("slope", 1.0)),
        unit=intensity.get("unit"),
        window=(float(window["center"]), float(window["width"])) if has_window else None,
        label=label,
        attributes=dict(meta.get("attributes") or {}),
        modality=meta.get("modality"),
        body_part=meta.get("body_part"),
        view=meta.get("view"),
        pixel_spacing=tuple(spacing) if spacing else None,
        slice_index=meta.get("slice_index"),
        split=name.split("-", 1)[0] if name.endswith(".tar") and "-" in name else None,
        spacing=tuple(float(v) for v in voxels) if voxels else None,
    )


def resolve_window(values, center, width):
    """Per-sample windows with "no window" filled in: ``(center, width)`` ``[B]`` tensors.

    ``values`` ``[B, ...]`` torch float in modality units; a NaN centre or width (or width <= 0)
    means the sample has no window, and gets its own min..max. Branch-free, so it never syncs an
    accelerator with the host.
    """
    import torch

    dims = tuple(range(1, values.ndim))
    no_window = ~torch.isfinite(center) | ~torch.isfinite(width) | (width <= 0)
    lo, hi = values.amin(dim=dims), values.amax(dim=dims)
    return (torch.where(no_window, (lo + hi) / 2, center),
            torch.where(no_window, (hi - lo).clamp_min(1e-6), width))


def window_to_unit(values, center, width, resolve: bool = True):
    """Modality values ``[B, ...]`` (torch float) -> [0, 1] through per-sample windows.

    ``center``/``width``: ``[B]`` tensors in modality units (see ``resolve_window`` for NaN;
    ``resolve=False`` when the caller already resolved them). The clip at the window's edges is
    part of the contract: values outside it carry no contrast, in pretraining and evaluation
    alike.
    """
    if resolve:
        center, width = resolve_window(values, center, width)
    shape = (values.shape[0],) + (1,) * (values.ndim - 1)
    low = (center - width / 2).view(shape)
    return ((values - low) / width.view(shape)).clamp_(0, 1)
