"""The per-worker memory budget: how many pixel values one decode may produce (``--max-pixels``).

A scan's header says how large its pixels are before anything is decoded, and a few hundred
bytes of header can claim a 60000 x 60000 image (an RLE or deflated "decompression bomb").
Every reader therefore prices the largest array it is about to decode *from the header
alone*, and quarantines the file as ``too_large`` when the price is over the budget:

* DICOM: one frame, ``Rows x Columns x SamplesPerPixel`` (frames are decoded one at a time,
  so a long tomosynthesis or cine series is fine); a deflated file inflates whole, so its
  inflated size is capped too (``inflate_cap``);
* PNG / JPEG / TIFF: one page, ``width x height x bands``;
* NIfTI: the whole volume, ``X x Y x Z x T`` voxels (nibabel loads it whole).

A value wider than 16 bits costs one unit per started 16 bits (a 32-bit float pixel counts
2): the readers keep an image as up to 32-bit values on its way to the 16-bit PNG, so this
is roughly proportional to a worker's working memory. ``DEFAULT_MAX_PIXELS`` was chosen by
measuring peak RSS with ``benchmarks/ingest_bombs.py`` (docs/internals.md has the figures).
"""

from __future__ import annotations

import math

#: 2**26 = 67,108,864 pixel values: an 8192 x 8192 16-bit frame, a 512 x 512 x 256 volume.
DEFAULT_MAX_PIXELS = 1 << 26
#: Bytes of header allowed on top of the pixel data when a deflated DICOM is inflated.
INFLATE_SLACK_BYTES = 1 << 20


def pixel_cost(*dims: int, bits: int = 16) -> int:
    """Budget units of an array of shape ``dims`` holding ``bits``-bit values."""
    values = 1
    for d in dims:
        values *= max(int(d), 0)
    return values * max(1, math.ceil(int(bits) / 16))


def check_pixels(cost: int, max_pixels: int, what: str) -> None:
    """Raise Quarantine("too_large") when ``cost`` budget units exceed ``max_pixels``.

    ``what`` names the decode unit in our own words and numbers only (e.g. "a 60000x60000
    frame"): messages never quote header text.
    """
    if cost > max_pixels:
        from medssl.data.quarantine import Quarantine

        raise Quarantine("too_large", f"{what} is {cost:,} pixel values, more than "
                                      f"--max-pixels {max_pixels:,}")


def inflate_cap(max_pixels: int) -> int:
    """Most bytes a deflated DICOM data set may inflate to: a budget-sized 16-bit image."""
    return 2 * max_pixels + INFLATE_SLACK_BYTES
