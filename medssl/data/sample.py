"""The one in-memory record between readers and the shard writer, and its on-disk encoding.

Readers (DICOM, NIfTI, images) turn a file into ``Slice`` objects; the shard writer turns each
into a WebDataset sample: ``img.png`` plus an allow-listed ``json``. Training and evaluation
read samples back through ``medssl.sample.read_sample`` (the reading side of this contract).

Intensity encoding. Grayscale slices are stored as 16-bit PNG. Stored value ``s`` maps back to
modality units (HU for CT) as ``value = s * slope + offset``; both numbers live in the
sample's ``json`` under ``intensity``. Integer data that fits 65,536 levels is stored
losslessly (slope 1); float data is spread linearly over the full 16-bit range.

Volumes (``medssl shard --volumes``) use the same encoding over the whole 3-D array, stored as
``vol.npy.gz``: a gzip'd NumPy ``.npy`` of uint16 ``[X, Y, Z]`` whose axes run left->Right,
posterior->Anterior, inferior->Superior (RAS), with the voxel size in the ``json``'s
``spacing`` (mm, same axis order). ``.npy`` is read with ``allow_pickle=False``, so the member
can never carry a pickle; WebDataset's own decoder reads it too (it gunzips ``.gz`` members).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

#: Metadata keys a sample's ``json`` may hold. Anything else never reaches a shard.
SAMPLE_META_KEYS = (
    "modality",        # DICOM Modality (CT, MR, CR, DX, ...) or "OT" for plain images
    "body_part",       # BodyPartExamined, upper case, or None
    "view",            # ViewPosition (PA, AP, LAT) or None
    "pixel_spacing",   # [row_mm, col_mm] or None
    "slice_index",     # position of the slice in its series/volume, or None
    "spacing",         # volumes only: [x_mm, y_mm, z_mm] of the stored RAS voxel grid
    "patient",         # pseudonym "p-<16 hex>"
    "study",           # pseudonym "s-<16 hex>" or None
    "series",          # pseudonym "r-<16 hex>" or None
    "channels",        # 1 (16-bit grayscale) or 3 (8-bit RGB)
    "intensity",       # {"offset": float, "slope": float, "unit": "HU" | None}
    "window",          # {"center": float, "width": float} in modality units, or None
    "label",           # int, or list of 0/1 for multi-label; only when a recipe gives labels
    "attributes",      # {sex, age band, site, manufacturer, model}: str each, only when asked
                       #   (medssl.data.attributes: what is read and how it is coarsened)
)


@dataclass
class Slice:
    """One decoded 2-D image (or, from ``--volumes``, one RAS volume) with the metadata
    training may use, before de-identification.

    ``pixels`` is ``[X, Y, Z]`` in modality units for a volume, else either ``[H, W]`` in modality units (any real dtype; CT in HU after the
    modality LUT, MONOCHROME1 already inverted) or ``[H, W, 3]`` uint8 RGB.
    ``patient_id``, ``study_id`` and ``series_id`` are the source's raw identifiers: the writer
    replaces them with pseudonyms and never stores them. ``source`` names the file (and frame)
    for the per-input report only.
    """

    pixels: np.ndarray
    patient_id: str
    source: str
    study_id: str | None = None
    series_id: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_index: int | None = None
    spacing: tuple[float, float, float] | None = None   # volumes: RAS voxel size in mm
    window: tuple[float, float] | None = None   # (center, width) in modality units
    unit: str | None = None                     # "HU" for CT after the modality LUT
    label: int | list[int] | None = None
    attributes: dict = field(default_factory=dict)   # coarsened already (data.attributes)
    extra: dict = field(default_factory=dict)   # reader-private; never written

    @property
    def is_volume(self) -> bool:
        return self.spacing is not None

    @property
    def channels(self) -> int:
        return 3 if self.pixels.ndim == 3 and not self.is_volume else 1


def encode_intensity(pixels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Map ``[H, W]`` (or ``[X, Y, Z]``) modality values to uint16: ``(stored, offset, slope)``.

    Integer-valued data spanning at most 65,536 levels is stored exactly: ``offset`` is the
    minimum and ``slope`` 1. Anything else is scaled linearly over 0..65535.
    """
    values = np.asarray(pixels)
    if values.ndim not in (2, 3):
        raise ValueError(f"expected a [H, W] image or [X, Y, Z] volume, got shape {values.shape}")
    finite = np.isfinite(values) if values.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        values = np.where(finite, values, np.nanmin(np.where(finite, values, np.inf)))
    lo = float(values.min())
    hi = float(values.max())
    integral = values.dtype.kind in "iub" or bool(np.all(np.mod(values, 1) == 0))
    if integral and hi - lo <= 65535:
        stored = (values.astype(np.int64) - int(lo)).astype(np.uint16)
        return stored, float(int(lo)), 1.0
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.rint((values.astype(np.float64) - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, lo, slope


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png16(image: np.ndarray) -> bytes:
    """PNG bytes of a uint16 ``[H, W]`` image: "Up" filter on every row, run-length deflate,
    no ancillary (text) chunks. Decodes with PIL to the same array (``sample.decode_image``).

    Written by hand because ingestion is PNG-bound and PIL's encoder always runs adaptive
    filtering (tries several filters per row) and offers no deflate strategy: on a 512x512 CT
    slice PIL at compress_level=1 spent 13.7 ms of CPU, this 4.7 ms, for a file ~1% smaller
    (Z_RLE suits filtered CT rows: long runs of near-zero differences). That is most of the
    gap between ~68 and 100+ slices/s per worker (benchmarks/ingest.py).
    """
    if image.dtype != np.uint16 or image.ndim != 2:
        raise ValueError(f"expected uint16 [H, W], got {image.dtype} {image.shape}")
    h, w = image.shape
    raw = np.ascontiguousarray(image, dtype=">u2").view(np.uint8).reshape(h, 2 * w)
    rows = np.empty((h, 2 * w + 1), np.uint8)
    rows[:, 0] = 2            # filter type Up: byte minus the byte above, mod 256
    rows[0, 0] = 0            # the first row has nothing above it
    rows[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=rows[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)  # 16-bit grayscale, no interlace
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", deflate.compress(rows.tobytes()) + deflate.flush())
            + _png_chunk(b"IEND", b""))


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint16 ``[H, W]`` or uint8 ``[H, W, 3]`` image, with no text chunks.

    16-bit grayscale goes through ``encode_png16``; RGB through PIL at compress_level=1, about
    3x faster than PIL's default (6) for ~20% larger files (ingestion is PNG-bound).
    """
    if image.dtype == np.uint16 and image.ndim == 2:
        return encode_png16(image)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        pil = Image.fromarray(image, mode="RGB")
    else:
        raise ValueError(f"cannot store dtype {image.dtype} shape {image.shape} as PNG")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


VOLUME_MEMBER = "vol.npy.gz"


def encode_volume(stored: np.ndarray) -> bytes:
    """``vol.npy.gz`` bytes of a uint16 ``[X, Y, Z]`` volume: deterministic (gzip mtime 0).

    Level 1: volumes are re-read every epoch, and gunzip at level 1 costs the loader about
    as much as decoding the same voxels from PNG.
    """
    if stored.dtype != np.uint16 or stored.ndim != 3:
        raise ValueError(f"expected uint16 [X, Y, Z], got {stored.dtype} {stored.shape}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(stored, dtype="<u2"), allow_pickle=False)
    return gzip.compress(buf.getvalue(), compresslevel=1, mtime=0)


def decode_volume(data: bytes) -> np.ndarray:
    """Decode a shard's ``vol.npy.gz`` to uint16 ``[1, X, Y, Z]`` (never unpickles)."""
    arr = np.load(io.BytesIO(gzip.decompress(data)), allow_pickle=False)
    if arr.dtype != np.uint16 or arr.ndim != 3:
        raise ValueError(f"volume member holds {arr.dtype} {arr.shape}, not uint16 [X, Y, Z]")
    return arr[None]


def decode_image(png: bytes) -> np.ndarray:
    """Decode a shard's ``img.png`` to ``[C, H, W]``: uint16 for grayscale, uint8 for RGB."""
    with Image.open(io.BytesIO(png)) as pil:
        if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(pil, dtype=np.uint16) if pil.mode != "I" else np.asarray(pil).astype(np.uint16)
            return arr[None]
        if pil.mode == "L":
            return np.asarray(pil, dtype=np.uint8)[None]
        return np.ascontiguousarray(np.asarray(pil.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
