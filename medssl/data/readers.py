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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.data.layout import JOURNAL_NAME
from medssl.data.quarantine import Quarantine, muted_loggers  # noqa: F401  (the readers' API)
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
    ".mask.png",  # finding masks (medssl synth's masks/): the truth of a score, never a scan
)
#: A DICOMDIR is an index of other files, never an image; its records name patients.
SKIPPED_NAMES = ("DICOMDIR",)
#: Files medssl writes beside a shard folder (salt, per-input report).
OWN_OUTPUT_SUFFIXES = (".salt", ".report.jsonl")


def _lower_name(path: Path) -> str:
    return path.name.lower()


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return _lower_name(path).endswith(suffixes)




def _is_shard_folder(folder: Path) -> bool:
    """A folder ``medssl shard`` wrote or is writing, which must not be read as input."""
    try:
        if (folder / JOURNAL_NAME).is_file():
            return True
        index = folder / "index.json"
        if not index.is_file():
            return False
        with index.open("rb") as f:
            return b"medssl-shards" in f.read(4096)
    except OSError:  # a folder we may not enter: the walk reports it
        return False


@dataclass(frozen=True)
class Found:
    """One entry discovery returns: a candidate scan file, or something that cannot be read.

    ``problem`` is a quarantine reason (``unreadable``) for an entry the walk could not open
    or follow -- a folder it may not list, a symlink loop, a dangling link -- so that it
    becomes a report line instead of a crash or a silent gap.
    """

    path: Path
    problem: str | None = None


def identity(path: Path | str) -> str:
    """The absolute, symlink-resolved path (the absolute path when it cannot be resolved,
    e.g. a symlink loop): what keys and the inputs digest are built from."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return os.path.abspath(path)


def _entry_problem(path: Path) -> str | None:
    """None for a file the readers can open, else why not (following symlinks)."""
    try:
        os.stat(path)
    except OSError:  # ELOOP (a link loop), ENOENT (a dangling link), EACCES
        return "unreadable"
    return None


def _walk(root: Path, seen: set[tuple[int, int]]) -> Iterator[Found]:
    """Every candidate under ``root``; symlinked folders are followed, each folder once.

    ``seen`` holds the (st_dev, st_ino) of every folder walked so far: a link back to an
    ancestor (a loop) or a second link to one folder is not walked again, so its files are
    reported once, under the first path that reached them.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            yield Found(folder, "unreadable")
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        folders = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            path = folder / name
            try:
                is_dir = entry.is_dir()  # follows a symlinked folder
            except OSError:
                is_dir = False
            if is_dir:
                if not _is_shard_folder(path):
                    folders.append(path)
                continue
            if name in SKIPPED_NAMES or _has_suffix(path, SIDECAR_SUFFIXES + OWN_OUTPUT_SUFFIXES):
                continue
            yield Found(path, _entry_problem(path))
        stack.extend(reversed(folders))  # depth first, in name order


def discover(inputs: list[Path]) -> list[Found]:
    """Every candidate scan file under ``inputs``, sorted by path, each once.

    Folders are walked recursively, following symlinked folders (each folder once);
    hidden files and folders, shard folders written by medssl, salt and report files,
    DICOMDIR indexes and obvious text sidecars (``SIDECAR_SUFFIXES``) are left out. Every
    other file is returned, recognised or not, so that an unknown format shows up in the
    report as ``unsupported_format`` instead of vanishing; a folder that cannot be listed,
    a symlink loop or a dangling link comes back with ``problem="unreadable"``. A file given
    directly is always returned. Raises MedsslError for an input that does not exist.
    """
    found: dict[str, Found] = {}
    seen: set[tuple[int, int]] = set()
    for given in inputs:
        path = Path(given)
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError:
            is_dir = is_file = False
        if is_dir:
            if _is_shard_folder(path):
                raise MedsslError(f"{path}: this is a medssl shard folder, not a folder of scans")
            candidates: Iterator[Found] = _walk(path, seen)
        elif is_file:
            candidates = iter([Found(path)])
        elif os.path.lexists(path):  # a symlink loop, a dangling link, no permission
            candidates = iter([Found(path, "unreadable")])
        else:
            raise MedsslError(f"{path}: input not found; pass existing files or folders")
        for candidate in candidates:
            found.setdefault(identity(candidate.path), candidate)
    return sorted(found.values(), key=lambda f: f.path.as_posix())


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
        dtype = pixels.dtype
        as_float = np.ascontiguousarray(pixels, dtype=np.float32)
        # Drop the full-size original before Pillow copies the plane: one full-size array
        # fewer at the peak of a large frame (the worker's memory budget counts on it).
        s.pixels = pixels = None
        plane = Image.fromarray(as_float, mode="F")
        del as_float
        out = np.asarray(plane.resize((new_w, new_h), Image.Resampling.BILINEAR))
        del plane
        if dtype.kind in "iub":
            info = np.iinfo(dtype if dtype.kind != "b" else np.uint8)
            out = np.clip(np.rint(out), info.min, info.max).astype(dtype)
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
    max_pixels: int | None = None,
) -> Iterator[Slice]:
    """Decode one file into 2-D slices, lazily (one frame or slice at a time).

    ``axis`` picks the anatomical plane NIfTI volumes are cut along (DICOM and plain images
    come as 2-D already). ``allow_burned_in`` keeps DICOMs flagged as carrying burned-in
    text (see ``dicom.read_dicom``). Slices whose longer side exceeds ``max_side`` pixels are
    shrunk (antialiased) and their pixel spacing scaled to match. ``max_pixels`` is the
    memory budget of one decode (``budget``; default ``budget.DEFAULT_MAX_PIXELS``): a file
    whose header claims more is quarantined as ``too_large`` before anything is decoded.

    Raises Quarantine, with a reason code, for anything it cannot or should not use; every
    library error is wrapped, so a bad file never crashes the caller. A Quarantine can come
    after some slices were already yielded (a multi-frame file whose frame 7 is corrupt):
    callers should treat the file as a whole.
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    if max_pixels is None:
        from medssl.data.budget import DEFAULT_MAX_PIXELS

        max_pixels = DEFAULT_MAX_PIXELS
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number, got {max_pixels}")
    path = Path(path)
    try:
        readable = path.is_file()
    except OSError:  # a symlink loop, a folder we may not enter
        readable = False
    if not readable:
        raise Quarantine("unreadable", "not a readable file")

    if _has_suffix(path, NIFTI_SUFFIXES):
        from medssl.data.nifti import read_nifti

        slices = read_nifti(path, axis=axis, max_pixels=max_pixels)
    elif _has_suffix(path, IMAGE_SUFFIXES):
        from medssl.data.images import read_image

        slices = read_image(path, max_pixels=max_pixels)
    elif _has_suffix(path, DICOM_SUFFIXES) or has_dicom_preamble(path):
        from medssl.data.dicom import read_dicom

        slices = read_dicom(path, allow_burned_in=allow_burned_in, max_pixels=max_pixels)
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
