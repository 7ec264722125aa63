"""DICOM files -> series (``medssl shard --volumes``): grouped, sorted and checked from headers.

Every DICOM file's header is read (pixel data left on disk: ``dicom_file.open_dataset``, the
same guarded open the 2-D reader uses), files are grouped by SeriesInstanceUID, and each
series' slices are sorted by their position along the slice normal,
``ImagePositionPatient . (row x column)`` of ImageOrientationPatient -- never by file name or
InstanceNumber, which exports shuffle and scanners restart. A series is then accepted as one
volume or quarantined, all before a voxel is decoded, with one of these reasons:

* ``multiframe``: an enhanced multi-frame file (its geometry lives per frame; not supported);
* ``missing_geometry``: a slice without ImagePositionPatient, ImageOrientationPatient or
  PixelSpacing (nothing to place it by);
* ``mixed_dimensions`` (Rows/Columns differ), ``mixed_patients`` (PatientID, PatientName or
  StudyInstanceUID differ), ``mixed_orientation`` (ImageOrientationPatient differs);
* ``inconsistent_spacing``: PixelSpacing differs between slices, or the steps between slice
  positions vary and are not whole multiples of the smallest;
* ``missing_slices``: every step is a whole multiple of the smallest, some are 2x or more
  (a slice, or several, missing from the export);
* ``duplicate_slices``: two slices at one position (two acquisitions sharing a series UID);
* ``gantry_tilt``: positions move off the slice normal (tilted CT: a sheared grid);
* ``too_few_slices``: fewer than ``MIN_SLICES``;
* ``too_large``: the stacked volume, or the volume resampled to ``--spacing``, exceeds
  ``--max-pixels`` (``budget``: one unit per voxel of up to 16 bits).

Tolerance: positions are compared to ``STEP_TOLERANCE`` of the step (plus ``ABS_TOLERANCE_MM``),
orientations to ``COSINE_TOLERANCE``; DICOM writes decimal strings, so equal geometry written by
two programs differs in the last digits. Details in the report are our own words and numbers;
raw identifiers are hashed at once and never leave this module.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medssl.data import budget
from medssl.data.quarantine import Quarantine

MIN_SLICES = 3
STEP_TOLERANCE = 0.01      # of the slice step
ABS_TOLERANCE_MM = 1e-3
COSINE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Header:
    """What grouping needs from one file's header (raw ids hashed; numbers only)."""

    path: str
    series: str | None = None          # sha256 of SeriesInstanceUID (grouping key only)
    patient: str | None = None         # sha256 of PatientID/PatientName/StudyInstanceUID
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, float] | None = None
    rows: int = 0
    cols: int = 0
    bits: int = 16
    frames: int = 1
    problem: str | None = None         # quarantine reason when the header is unusable


@dataclass
class Series:
    """One SeriesInstanceUID's files, sorted along the slice normal, and its verdict."""

    files: list[str]
    reason: str | None = None
    detail: str | None = None
    headers: list[Header] = field(default_factory=list, repr=False)


def _hash(text: str | None) -> str | None:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest() if text else None


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def read_header(path: str, max_pixels: int) -> Header:
    """The grouping fields of one file, or a Header with ``problem`` set (never raises)."""
    from medssl.data import dicom, dicom_file

    try:
        with dicom._silenced():
            ds = dicom_file.open_dataset(Path(path), max_pixels)
            dicom.check_policy(ds, allow_burned_in=True)  # burned-in is judged when decoding
            ident = None
            for keyword in ("PatientID", "PatientName", "StudyInstanceUID"):
                value = dicom._text(ds.get(keyword))
                if value and value.strip("^= "):
                    ident = value
                    break
            return Header(
                path=path,
                series=_hash(dicom._text(ds.get("SeriesInstanceUID"))),
                patient=_hash(ident),
                position=_floats(ds.get("ImagePositionPatient"), 3),
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
                rows=int(dicom._number(ds.get("Rows")) or 0),
                cols=int(dicom._number(ds.get("Columns")) or 0),
                bits=int(dicom._number(ds.get("BitsAllocated")) or 16),
                frames=int(dicom._number(ds.get("NumberOfFrames")) or 1),
            )
    except Quarantine as exc:
        return Header(path=path, problem=exc.reason)
    except Exception:  # a header pydicom chokes on is a per-file problem, never a crash
        return Header(path=path, problem="unreadable")


def read_headers(paths: list[str], max_pixels: int, workers: int) -> Iterator[Header]:
    """``read_header`` of every path, in order; on ``workers`` spawned processes when > 1."""
    if workers <= 1 or len(paths) < 64:
        for p in paths:
            yield read_header(p, max_pixels)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(max_workers=workers,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(partial(read_header, max_pixels=max_pixels), paths, chunksize=32)


def group_series(headers: Iterable[Header]) -> tuple[list[Series], list[Header]]:
    """(series, unusable files): series in order of their first file; bad headers apart."""
    groups: dict[str, list[Header]] = {}
    bad: list[Header] = []
    for h in headers:
        if h.problem is not None:
            bad.append(h)
        elif h.series is None:
            bad.append(Header(path=h.path, problem="no_series_uid"))
        else:
            groups.setdefault(h.series, []).append(h)
    return [check_series(hs) for hs in groups.values()], bad


def normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Unit slice normal ``row x column`` of an ImageOrientationPatient (LPS)."""
    n = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    return n / max(float(np.linalg.norm(n)), 1e-12)


def check_series(headers: list[Header]) -> Series:
    """Sort one series along its normal and judge its geometry (module docstring); the verdict
    is the first problem found. The budget is ``check_budget``'s."""
    def verdict(reason: str, detail: str | None = None) -> Series:
        return Series(files=[h.path for h in headers], reason=reason, detail=detail,
                      headers=headers)

    if any(h.frames > 1 for h in headers):
        return verdict("multiframe", "multi-frame files are not read as volumes")
    if any(h.position is None or h.orientation is None or h.pixel_spacing is None
           for h in headers):
        return verdict("missing_geometry", "a slice has no position, orientation or pixel "
                                           "spacing")
    if len({(h.rows, h.cols) for h in headers}) > 1:
        return verdict("mixed_dimensions", "slices differ in rows/columns")
    if len({h.patient for h in headers}) > 1:
        return verdict("mixed_patients", "slices name different patients or studies")
    first = np.asarray(headers[0].orientation)
    if any(np.abs(np.asarray(h.orientation) - first).max() > COSINE_TOLERANCE for h in headers):
        return verdict("mixed_orientation", "slices differ in ImageOrientationPatient")
    ps0 = np.asarray(headers[0].pixel_spacing)
    if any(np.abs(np.asarray(h.pixel_spacing) - ps0).max() > STEP_TOLERANCE * ps0.min()
           for h in headers):
        return verdict("inconsistent_spacing", "slices differ in PixelSpacing")
    n = normal(headers[0].orientation)
    where = np.array([np.dot(h.position, n) for h in headers])
    order = np.argsort(where, kind="stable")
    headers = [headers[i] for i in order]
    where = where[order]
    if len(headers) < MIN_SLICES:
        return verdict("too_few_slices", f"{len(headers)} slices; a volume needs {MIN_SLICES}")
    steps = np.diff(where)
    smallest = float(steps.min())
    if smallest <= ABS_TOLERANCE_MM:
        return verdict("duplicate_slices", "two slices at the same position")
    positions = np.array([h.position for h in headers])
    drift = positions - positions[0] - np.outer(where - where[0], n)
    if float(np.abs(drift).max()) > STEP_TOLERANCE * smallest + ABS_TOLERANCE_MM:
        return verdict("gantry_tilt", "slice positions move off the slice normal (tilted "
                                      "acquisition)")
    ratio = steps / smallest
    whole = np.rint(ratio)
    tol = STEP_TOLERANCE + ABS_TOLERANCE_MM / smallest
    if np.abs(ratio - 1).max() > tol:
        if np.abs(ratio - whole).max() <= tol * whole.max():
            gaps = int((whole - 1).sum())
            return verdict("missing_slices", f"{gaps} slices missing: steps of up to "
                                             f"{int(whole.max())}x the {smallest:.4g} mm step")
        return verdict("inconsistent_spacing", f"slice steps vary from {smallest:.4g} to "
                                               f"{float(steps.max()):.4g} mm")
    return Series(files=[h.path for h in headers], headers=headers)


def step_mm(series: Series) -> float:
    """The slice step of an accepted series, mm (mean of its steps)."""
    n = normal(series.headers[0].orientation)
    where = [float(np.dot(h.position, n)) for h in series.headers]
    return (where[-1] - where[0]) / (len(where) - 1)


def lps_affine(series: Series) -> np.ndarray:
    """The 4x4 voxel -> LPS mm affine of the volume ``vol[column, row, slice]`` of a series.

    DICOM PS3.3 C.7.6.2.1.1: a pixel at column ``i``, row ``j`` lies at
    ``IPP + i * PixelSpacing[1] * rowdir + j * PixelSpacing[0] * coldir``; slice ``k`` is the
    first sorted slice moved ``k`` steps along the normal.
    """
    h0 = series.headers[0]
    o = np.asarray(h0.orientation, dtype=np.float64)
    row_mm, col_mm = h0.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = o[:3] * col_mm
    affine[:3, 1] = o[3:] * row_mm
    affine[:3, 2] = normal(h0.orientation) * step_mm(series)
    affine[:3, 3] = h0.position
    return affine


def check_budget(series: Series, pixdim: tuple[float, float, float] | None,
                 max_pixels: int) -> Series:
    """``too_large`` verdict when the stacked or the resampled volume is over the budget."""
    if series.reason is not None:
        return series
    h0 = series.headers[0]
    shape = (h0.cols, h0.rows, len(series.files))
    try:
        budget.check_pixels(budget.pixel_cost(*shape, bits=h0.bits), max_pixels,
                            f"a {'x'.join(map(str, shape))} series of {h0.bits}-bit values")
        if pixdim is not None:
            out = resampled_shape(lps_affine(series), shape, pixdim)
            budget.check_pixels(budget.pixel_cost(*out), max_pixels,
                                f"the series resampled to {'x'.join(map(str, out))} voxels")
    except Quarantine as exc:
        return Series(files=series.files, reason=exc.reason, detail=exc.message,
                      headers=series.headers)
    return series


def resampled_shape(affine: np.ndarray, shape: tuple[int, int, int],
                    pixdim: tuple[float, float, float]) -> tuple[int, int, int]:
    """An upper bound on the voxel grid ``Spacing(pixdim)`` makes of a volume (for the budget):
    the extent along each world axis over the new voxel size, plus one."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]) @ affine.T
    extent = corners[:, :3].max(axis=0) - corners[:, :3].min(axis=0)
    steps = np.abs(affine[:3, :3]).max(axis=1)  # the voxel size along each world axis
    size = [math.ceil((e + s) / p) + 1 for e, s, p in zip(extent, steps, pixdim)]
    return size[0], size[1], size[2]
