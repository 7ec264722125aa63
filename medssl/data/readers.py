"""Find scan files and turn any one of them into 2-D ``Slice`` objects, or say why not.

The shard pipeline calls three things from here: ``discover`` (inputs -> sorted file list),
``read_slices`` (one file -> ``Iterator[Slice]``) and ``Quarantine`` (the one exception a
reader raises for a file it will not use). A quarantined file is reported with its reason
code and never silently dropped.

Quarantine messages are built only from our own words and library exception *class names*,
never from text inside the file or from library messages (which can quote header values such
as names or dates): the report and the logs must not carry what a scan's header holds.

Reader dispatch is by extension first (``.dcm``/``.dicom``, ``.nii``/``.nii.gz``,
``.png``/``.jpg``/``.jpeg``/``.tif``/``.tiff``), then by content (a DICOM Part 10 preamble,
"DICM" at byte 128). Files that are neither are quarantined as ``unsupported_format``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from medssl.data.sample import Slice
from medssl.errors import MedsslError

log = logging.getLogger(__name__)

AXES = ("axial", "coronal", "sagittal")

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

#: Sidecars that sit beside scans and are certainly not images: ``discover`` leaves them out
#: of a folder walk instead of reporting each one as ``unsupported_format`` (labels tables,
#: BIDS json, DWI gradient tables, notes). A file named explicitly on the command line is
#: still returned, whatever its type.
SIDECAR_SUFFIXES = (
    ".csv", ".tsv", ".json", ".jsonl", ".txt", ".yaml", ".yml", ".md", ".log",
    ".bval", ".bvec", ".xml", ".html", ".pdf",
)
#: A DICOMDIR is an index of other files, never an image; its records name patients.
SKIPPED_NAMES = ("DICOMDIR",)
#: Files medssl writes beside a shard folder (salt, per-input report).
OWN_OUTPUT_SUFFIXES = (".salt", ".report.jsonl")


class Quarantine(Exception):
    """A file the readers will not turn into samples, with a short snake_case ``reason``.

    Reasons in use: ``unreadable``, ``truncated``, ``unsupported_format``,
    ``unsupported_transfer_syntax``, ``undecodable``, ``unsupported_dimensions``,
    ``burned_in_annotation``, ``secondary_capture``, ``ultrasound_burned_in``,
    ``not_an_image``, ``no_pixel_data``, ``empty_volume``, ``too_large``.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message or reason

    def __reduce__(self):
        # Survive the trip back from a worker process with reason and message intact.
        return (type(self), (self.reason, self.message))


@contextmanager
def muted_loggers(*names: str) -> Iterator[None]:
    """Silence the named library loggers and their children for the duration.

    Decoders log header and chunk *values* (pydicom quotes invalid names and dates at
    WARNING, Pillow prints EXIF/tEXt values at DEBUG); nothing from a file may reach a log.
    Readers hold this only around synchronous library calls, never across a ``yield``.
    """
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)  # children left at NOTSET inherit this
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


def _lower_name(path: Path) -> str:
    return path.name.lower()


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return _lower_name(path).endswith(suffixes)


#: The progress journal an unfinished ``medssl shard`` run keeps in its folder (shard.py).
SHARD_JOURNAL_NAME = ".progress.jsonl"


def _is_shard_folder(folder: Path) -> bool:
    """A folder ``medssl shard`` wrote or is writing, which must not be read as input."""
    if (folder / SHARD_JOURNAL_NAME).is_file():
        return True
    index = folder / "index.json"
    if not index.is_file():
        return False
    try:
        with index.open("rb") as f:
            return b"medssl-shards" in f.read(4096)
    except OSError:
        return False


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        # Prune in place so os.walk never descends into hidden folders or our own shards.
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not _is_shard_folder(here / d)
        )
        for name in filenames:
            if name.startswith(".") or name in SKIPPED_NAMES:
                continue
            path = here / name
            if _has_suffix(path, SIDECAR_SUFFIXES + OWN_OUTPUT_SUFFIXES):
                continue
            yield path


def discover(inputs: list[Path]) -> list[Path]:
    """Every candidate scan file under ``inputs``, sorted by path, each once.

    Folders are walked recursively; hidden files and folders, shard folders written by medssl,
    salt and report files, DICOMDIR indexes and obvious text sidecars (``SIDECAR_SUFFIXES``)
    are left out. Every other file is returned, recognised or not, so that an unknown format
    shows up in the report as ``unsupported_format`` instead of vanishing. A file given
    directly is always returned. Raises MedsslError for an input that does not exist.
    """
    found: dict[str, Path] = {}
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            if _is_shard_folder(path):
                raise MedsslError(f"{path}: this is a medssl shard folder, not a folder of scans")
            candidates: Iterator[Path] = _walk(path)
        elif path.is_file():
            candidates = iter([path])
        else:
            raise MedsslError(f"{path}: input not found; pass existing files or folders")
        for candidate in candidates:
            found.setdefault(str(candidate.resolve()), candidate)
    return sorted(found.values(), key=lambda p: p.as_posix())


def has_dicom_preamble(path: Path) -> bool:
    """True when bytes 128..131 are ``DICM`` (DICOM Part 10 file, whatever its name)."""
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _resize(s: Slice, max_side: int) -> Slice:
    """Shrink ``s`` so its longer side is ``max_side``, keeping the aspect ratio.

    Pillow's bilinear filter widens its support when shrinking, so it averages every source
    pixel (antialiased); bicubic and Lanczos would overshoot and give a resized CT values
    below air. Grayscale goes through 32-bit float ('F' mode) so 16-bit and HU values keep
    their range; integer input is rounded back to its dtype so it still encodes losslessly.
    Pillow rather than torch: single-threaded and as fast, which is what parallel shard
    workers want. Pixel spacing grows by the same factor per axis.
    """
    from PIL import Image

    pixels = s.pixels
    h, w = pixels.shape[:2]
    scale = max_side / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if pixels.ndim == 3:
        out = np.asarray(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="RGB")
                         .resize((new_w, new_h), Image.Resampling.BILINEAR))
    else:
        plane = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        out = np.asarray(plane.resize((new_w, new_h), Image.Resampling.BILINEAR))
        if pixels.dtype.kind in "iub":
            info = np.iinfo(pixels.dtype if pixels.dtype.kind != "b" else np.uint8)
            out = np.clip(np.rint(out), info.min, info.max).astype(pixels.dtype)
    s.pixels = np.ascontiguousarray(out)
    if s.pixel_spacing is not None:
        s.pixel_spacing = (s.pixel_spacing[0] * h / new_h, s.pixel_spacing[1] * w / new_w)
    return s


def read_slices(
    path: Path,
    *,
    axis: str = "axial",
    allow_burned_in: bool = False,
    max_side: int | None = None,
) -> Iterator[Slice]:
    """Decode one file into 2-D slices, lazily (one frame or slice at a time).

    ``axis`` picks the anatomical plane NIfTI volumes are cut along (DICOM and plain images
    come as 2-D already). ``allow_burned_in`` keeps DICOMs flagged as carrying burned-in
    text (see ``dicom.read_dicom``). Slices whose longer side exceeds ``max_side`` pixels are
    shrunk (antialiased) and their pixel spacing scaled to match.

    Raises Quarantine, with a reason code, for anything it cannot or should not use; every
    library error is wrapped, so a bad file never crashes the caller. A Quarantine can come
    after some slices were already yielded (a multi-frame file whose frame 7 is corrupt):
    callers should treat the file as a whole.
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    path = Path(path)
    if not path.is_file():
        raise Quarantine("unreadable", "not a readable file")

    if _has_suffix(path, NIFTI_SUFFIXES):
        from medssl.data.nifti import read_nifti

        slices = read_nifti(path, axis=axis)
    elif _has_suffix(path, IMAGE_SUFFIXES):
        from medssl.data.images import read_image

        slices = read_image(path)
    elif _has_suffix(path, DICOM_SUFFIXES) or has_dicom_preamble(path):
        from medssl.data.dicom import read_dicom

        slices = read_dicom(path, allow_burned_in=allow_burned_in)
    else:
        raise Quarantine("unsupported_format", "not DICOM, NIfTI, PNG, JPEG or TIFF")

    try:
        for s in slices:
            if max_side is not None and max(s.pixels.shape[:2]) > max_side:
                s = _resize(s, max_side)
            yield s
    except Quarantine:
        raise
    except MemoryError as exc:
        raise Quarantine("too_large", "decoding ran out of memory") from exc
    except Exception as exc:  # any decoder failure is a per-file problem
        # Only the class name: library messages can quote header values.
        raise Quarantine("unreadable", f"decoder raised {type(exc).__name__}") from exc
