"""Perceptual hashes of shard images, computed in each sample's own window, in float.

The hash is pHash (2-D DCT-II of a small image, the ``k x k`` lowest frequencies, one bit per
coefficient above their median) taken on a *pose-normalised* view: the windowed image is
resampled on a grid centred on its intensity centroid, turned to its principal axis and
scaled by its radius of gyration (``canonical``). Why: on scan-like images plain pHash does not
survive the copies it must catch. Measured on 800 synthetic chest slices (benchmarks/leakage.py
draws them), a 10% crop moved a plain 64-bit pHash by 14 bits at the median while unrelated
slices of other patients were 4 bits apart at their 1st percentile; after pose normalisation
a crop moved it by 0 bits at the median and the 256-bit hash separated copies (all five
transforms at once) from unrelated pairs. Air is black in any window, so cropping air does not
move the moments at all.

Why by hand and not ``imagehash``: ``imagehash.phash`` converts its PIL input to mode "L"
(8 bits) before the DCT, the 8-bit clip this must avoid (a 16-bit CT slice squeezed into 256
levels over its stored range keeps almost nothing of the soft tissue a reader sees), and it
has no pose normalisation. Here stored uint16 values go back to modality units
(``ShardSample.modality_units``), through the sample's window to float ``[0, 1]``, and every
later step stays in float. Bits are packed big-endian per byte (``np.packbits``): the layout
faiss' binary indexes take.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn
from scipy.ndimage import map_coordinates

from medssl.sample import ShardSample

#: Default hash length: 16 x 16 DCT coefficients. 64 bits (8 x 8) cannot tell the synthetic
#: chests apart (unrelated pairs 4 bits apart at the 1st percentile, benchmarks/leakage.py).
DEFAULT_BITS = 256
HASH_BITS = (64, 256)
#: Side of the pose-normalised grid, and its half-extent in radii of gyration.
CANONICAL_SIDE = 64
CANONICAL_EXTENT = 2.2
#: Images are box-reduced to at most this side before the moments: they need no more detail.
_WORK_SIDE = 128
#: A view whose standard deviation is below this (in window units) is blank: no hash.
BLANK_STD = 1e-3


def unit_view(sample: ShardSample) -> np.ndarray:
    """A shard sample's image as float32 ``[H, W]`` in ``[0, 1]``: what a reader of it sees.

    Grayscale uint16: stored -> modality units (``ShardSample.modality_units``, the sample's
    intensity encoding) -> the sample's window (min-max when it has none). RGB uint8: the
    channel mean / 255.
    """
    if sample.image.dtype == np.uint8:
        return sample.image.astype(np.float32).mean(axis=0) / 255.0
    values = sample.modality_units()[0]
    if sample.window is not None:
        center, width = sample.window
        lo, hi = float(center) - float(width) / 2.0, float(center) + float(width) / 2.0
    else:
        lo, hi = float(values.min()), float(values.max())
    return np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def _box(unit: np.ndarray, width: int, height: int) -> np.ndarray:
    pil = Image.fromarray(np.ascontiguousarray(unit, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((width, height), Image.Resampling.BOX), dtype=np.float64)


def canonical(unit: np.ndarray, side: int = CANONICAL_SIDE,
              extent: float = CANONICAL_EXTENT) -> np.ndarray:
    """Pose-normalised ``[side, side]`` float64 view of a ``[H, W]`` image in ``[0, 1]``.

    Translation, scale and (for elongated content) rotation come from the intensity moments,
    so a shifted, resized, cropped-in-the-background or slightly rotated copy lands on nearly
    the same grid. The principal axis is turned to the nearest image axis (its angle taken
    modulo 90 degrees): unambiguous for content lying within about 40 degrees of the image's
    rows or columns, as scans do; a copy of content near 45 degrees can flip by 90 and be
    missed. Content whose two axes differ by under 5% keeps its rotation (its axis is noise).
    """
    h, w = unit.shape
    if max(h, w) > _WORK_SIDE:
        f = _WORK_SIDE / max(h, w)
        unit = _box(unit, max(1, round(w * f)), max(1, round(h * f)))
    u = np.asarray(unit, dtype=np.float64)
    h, w = u.shape
    mass = u.sum()
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (u * yy).sum() / mass, (u * xx).sum() / mass
    dy, dx = yy - cy, xx - cx
    cov = np.array([[(u * dx * dx).sum(), (u * dx * dy).sum()],
                    [(u * dx * dy).sum(), (u * dy * dy).sum()]]) / mass
    evals, evecs = np.linalg.eigh(cov)
    radius = max(float(np.sqrt(np.sqrt(max(evals[0], 0.0) * max(evals[1], 0.0)))), 0.5)
    theta = 0.0
    if evals[1] > 1.05 * evals[0]:
        major = float(np.arctan2(evecs[1, 1], evecs[0, 1]))
        # Modulo 90 degrees, into [-45, 45): an axis has no sign, and a body lying along the
        # image's columns must not be turned on its side.
        theta = (major + np.pi / 4) % (np.pi / 2) - np.pi / 4
    grid = ((np.arange(side) + 0.5) / side * 2.0 - 1.0) * extent * radius
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    c, s = np.cos(theta), np.sin(theta)
    x = cx + c * gx - s * gy
    y = cy + s * gx + c * gy
    return map_coordinates(u, [y, x], order=1, mode="constant", cval=0.0)


def is_blank(unit: np.ndarray) -> bool:
    """True for a view with no content in its window (one flat value): its hash means nothing."""
    return float(np.std(unit)) < BLANK_STD


def phash(unit: np.ndarray, bits: int = DEFAULT_BITS) -> np.ndarray:
    """Hash of a float ``[H, W]`` view (``unit_view``'s output): ``bits // 8`` uint8 bytes."""
    if bits not in HASH_BITS:
        raise ValueError(f"hash bits must be one of {HASH_BITS}, got {bits}")
    k = round(bits ** 0.5)
    view = canonical(unit)
    if view.shape[0] != 4 * k:
        view = _box(view, 4 * k, 4 * k)
    low = dctn(view, type=2, norm="ortho")[:k, :k].ravel()
    return np.packbits(low > np.median(low))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between packed hashes ``a [..., n]`` and ``b [..., n]`` (broadcast)."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)
