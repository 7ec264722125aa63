"""PNG / JPEG / TIFF file -> 2-D slices (one per TIFF page).

Pillow decodes; only the pixel array is used. Text chunks (PNG tEXt/iTXt/zTXt), EXIF, XMP,
ICC profiles and TIFF tags are never read into the Slice, because they are where dates,
names and device serials hide. The one exception is the EXIF *orientation* flag, which is
applied to the pixels (a phone photo of a film would otherwise come out sideways) and then
forgotten.

Mode handling (Pillow mode -> Slice.pixels):
``1``/``L``/``LA``/``P`` with a gray palette -> uint8 ``[H, W]``;
``I;16*`` -> uint16 ``[H, W]``; ``I`` (32-bit int) -> int32; ``F`` (32-bit float) -> float32;
``RGB``/``RGBA``/``P``/``CMYK``/``YCbCr``/``LAB`` -> uint8 ``[H, W, 3]`` (alpha dropped).
Pillow reads 16-bit-per-channel RGB PNGs as 8-bit RGB, which is what the shard stores anyway.

Identity: plain images carry no patient id, so ``patient_id`` is the parent folder's name
(keep one folder per patient); a recipe can override it. Modality is ``OT`` (other).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from medssl.data import budget
from medssl.data.budget import DEFAULT_MAX_PIXELS
from medssl.data.quarantine import Quarantine, muted_loggers
from medssl.data.sample import Slice


def _pil_silenced():
    # Pillow logs chunk and EXIF tag values (dates, descriptions) at DEBUG.
    return muted_loggers("PIL")


def _pixels(frame) -> np.ndarray:
    """One Pillow frame -> ``[H, W]`` grayscale or uint8 ``[H, W, 3]`` RGB."""
    mode = frame.mode
    if mode.startswith("I;16"):
        return np.asarray(frame).astype(np.uint16)
    if mode == "I":
        return np.asarray(frame, dtype=np.int32)
    if mode == "F":
        return np.asarray(frame, dtype=np.float32)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(frame.convert("L"), dtype=np.uint8)
    if mode == "P":
        rgb = np.asarray(frame.convert("RGB"), dtype=np.uint8)
        # A gray palette (common for scanned films) stays single-channel.
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])
        return rgb
    return np.asarray(frame.convert("RGB"), dtype=np.uint8)


def _page_cost(img) -> int:
    """Budget units of the current page, from its header: width x height x bands."""
    mode = img.mode
    bits = 32 if mode in ("I", "F") else 16 if mode.startswith("I;16") else 8
    width, height = img.size
    return budget.pixel_cost(width, height, len(img.getbands()), bits=bits)


@contextmanager
def _pillow_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own bomb check (``MAX_IMAGE_PIXELS``, width x height) set to our budget.

    Our check counts bands too, so it always refuses first; Pillow's stays as a backstop
    for paths we do not see (it raises only past twice its limit) and never refuses an
    image the budget allows, whatever ``--max-pixels`` says.
    """
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Slice]:
    """Yield every page of a PNG/JPEG/TIFF as a Slice (``modality`` "OT", no spacing).

    A page over ``max_pixels`` (``budget``) is refused as ``too_large`` from its header,
    before it is decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with warnings.catch_warnings(), _pil_silenced(), _pillow_limit(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise Quarantine("too_large", f"image exceeds --max-pixels {max_pixels:,}") from exc
    except UnidentifiedImageError as exc:
        raise Quarantine("unreadable", "not a decodable PNG/JPEG/TIFF") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Quarantine("unreadable", f"image open failed ({type(exc).__name__})") from exc
    with img:
        try:
            with _pil_silenced():
                n_pages = getattr(img, "n_frames", 1)
            for page in range(n_pages):
                with _pil_silenced(), _pillow_limit(max_pixels), warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    img.seek(page)
                    # The header's claim, before the page is decoded.
                    width, height = img.size
                    budget.check_pixels(_page_cost(img), max_pixels,
                                        f"a {width}x{height} {img.mode} page")
                    img.load()
                    pixels = _pixels(ImageOps.exif_transpose(img))
                if pixels.size == 0:
                    raise Quarantine("empty_volume", "the image has no pixels")
                yield Slice(
                    pixels=np.ascontiguousarray(pixels),
                    patient_id=path.parent.name or "unknown",
                    source=f"{path}#page={page}" if n_pages > 1 else str(path),
                    modality="OT",
                    slice_index=page if n_pages > 1 else None,
                )
        except Quarantine:
            raise
        except Image.DecompressionBombError as exc:
            raise Quarantine("too_large", f"image exceeds --max-pixels {max_pixels:,}") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            # Pillow reports a cut-off file as OSError("image file is truncated ...").
            reason = "truncated" if "truncated" in str(exc).lower() else "unreadable"
            raise Quarantine(reason, f"image decode failed ({type(exc).__name__})") from exc
