"""NIfTI volume -> 2-D slices along an anatomical axis, whatever the file's affine.

nibabel reads the header and the voxels; ``scl_slope``/``scl_inter`` are applied, so values
are in the scanner's real units. ``nibabel.orientations`` then permutes and flips the array
(as ``nibabel.as_closest_canonical`` does) so that array axis 0 runs left->Right,
1 posterior->Anterior, 2 inferior->Superior. "axial" therefore cuts along axis 2, "coronal"
along 1, "sagittal" along 0, for any acquisition orientation.

Memory. The header is read on its own first (the first 540 bytes, never the extensions), so
the volume's size is checked against the worker's budget (``budget``, ``--max-pixels``)
before a voxel is read; then the voxels are read once and widened to float32 in place.
MONAI's ``LoadImage`` + ``Orientation`` did this job before, but they import torch and MONAI
into every worker (about 370 MB of resident memory each) and copy the volume twice (about 38
bytes per voxel at the peak, against 6 here).

Display orientation: each 2-D slice is returned the way a radiologist views it, matching
DICOM's usual layout so NIfTI and DICOM slices of one body part look alike:
axial - anterior at the top, patient's right on the image's left (radiological convention);
coronal - superior at the top, patient's right on the left;
sagittal - superior at the top, anterior on the left.
In RAS array terms all three are ``plane[::-1, ::-1].T`` of the two remaining axes.

4-D files (time series, diffusion directions, echoes): every 3-D volume along the 4th
dimension is sliced, because separate volumes are usually separate contrasts; the slice
index is the position along the cut axis, and the volume number is in ``Slice.source``.
Volumes with more dimensions are quarantined (``unsupported_dimensions``).

Identity: NIfTI has no patient identifier. ``patient_id`` is the BIDS subject folder
(``sub-<label>``) when the file sits under one, so a subject's T1, T2 and DWI stay one
patient; otherwise the file name without ``.nii``/``.nii.gz``. Outside BIDS, keep one file
per patient or use a recipe that names the patient, or the patient-level split means
nothing. Nothing from the
header's free-text fields (``descrip``, ``aux_file``, ``db_name``, ``intent_name``) or its
extensions is ever copied: the Slice is built from the voxel array and the affine only.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medssl.data import budget
from medssl.data.budget import DEFAULT_MAX_PIXELS
from medssl.data.quarantine import Quarantine, muted_loggers
from medssl.data.sample import Slice

#: Which RAS array axis each anatomical plane is cut along.
AXIS_INDEX = {"sagittal": 0, "coronal": 1, "axial": 2}


def _patient(path: Path) -> str:
    # BIDS names every file after its subject (sub-07/anat/sub-07_T1w.nii.gz); requiring both
    # the folder and the file prefix keeps an unrelated "sub-projects" folder from matching.
    for folder in list(path.parents)[:3]:
        if re.fullmatch(r"sub-[A-Za-z0-9]+", folder.name) and path.name.startswith(folder.name + "_"):
            return folder.name
    return _stem(path)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


#: Header plus extensions a single-file NIfTI may carry before its voxels. Extensions hold
#: metadata (a few KB to a few MB of converter notes); nibabel reads each one whole, so a
#: gzipped file could otherwise claim gigabytes of "extension" from a few kilobytes.
MAX_HEADER_BYTES = 64 << 20


def _header(path: Path):
    """The NIfTI-1/2 header alone (no extensions, no voxels), from the first 540 bytes."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path), "rb") as f:
            block = f.read(540)
    except EOFError as exc:
        raise Quarantine("truncated", "the file ends inside its header") from exc
    except Exception as exc:  # gzip and OS errors for a broken .nii.gz
        raise Quarantine("unreadable", f"NIfTI header unreadable ({type(exc).__name__})") from exc
    if len(block) < 4:
        raise Quarantine("truncated", "the file ends inside its header")
    sizes = {int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")}
    klass = nib.Nifti1Header if 348 in sizes else nib.Nifti2Header if 540 in sizes else None
    if klass is None:
        raise Quarantine("unreadable", "not a NIfTI-1 or NIfTI-2 file")
    size = klass.template_dtype.itemsize
    if len(block) < size:
        raise Quarantine("truncated", "the file ends inside its header")
    try:
        header = klass(block[:size])
    except Exception as exc:  # HeaderDataError and friends: a broken header
        raise Quarantine("unreadable", f"NIfTI header invalid ({type(exc).__name__})") from exc
    if not header.is_single:
        raise Quarantine("unsupported_format", "a .hdr/.img pair saved as .nii")
    if header.get_data_offset() > MAX_HEADER_BYTES:
        raise Quarantine("too_large", f"header extensions claim more than {MAX_HEADER_BYTES:,} "
                                      "bytes")
    return header


def _load_ras(path: Path, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(volumes [T, X, Y, Z] float32 in RAS order, voxel size (x, y, z) in mm)``.

    The header's shape is checked against the budget before a voxel is read; the voxels
    are read once (raw), widened to float32 and scaled in place (about 6 bytes per voxel
    at the peak, where ``get_fdata`` takes 12); the RAS reorientation is a view.
    """
    from nibabel.orientations import apply_orientation, io_orientation

    volumes, affine = load_scaled(path, _header(path), max_pixels)
    ornt = io_orientation(affine)
    # (X, Y, Z, T) -> RAS axes (views: flips and a transpose), then time first.
    volumes = np.moveaxis(apply_orientation(volumes, ornt), 3, 0)
    spacing = np.zeros(3)
    for axis, (target, _flip) in enumerate(ornt):
        spacing[int(target)] = np.linalg.norm(affine[:3, axis])
    return volumes, spacing


def read_header(path: Path):
    """The NIfTI header alone (``_header``), for callers that price a volume before reading it
    (``medssl.data.volumes``); raises Quarantine like the reader."""
    return _header(Path(path))


def load_scaled(path: Path, header, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels [X, Y, Z, T] float32 in the file's scaled units, 4x4 voxel -> RAS mm affine)``,
    in the file's own axis order; 3-D files get T = 1. Budget checked from ``header`` first."""
    from nibabel.arrayproxy import ArrayProxy

    shape = tuple(int(d) for d in header.get_data_shape())
    if len(shape) not in (3, 4):
        raise Quarantine("unsupported_dimensions",
                         f"expected a 3-D or 4-D volume, got {len(shape)} dimensions")
    bits = header.get_data_dtype().itemsize * 8
    budget.check_pixels(budget.pixel_cost(*shape, bits=bits), max_pixels,
                        f"a {'x'.join(map(str, shape))} volume of {bits}-bit values")
    try:
        with warnings.catch_warnings(), muted_loggers("nibabel"):
            # nibabel warnings can quote header text; the file is judged by what loads.
            warnings.simplefilter("ignore")
            raw = np.asarray(ArrayProxy(str(path), header).get_unscaled())
            volumes = raw.astype(np.float32, copy=False)
            del raw
            slope, inter = header.get_slope_inter()
            scaled = (slope is not None and slope != 1.0) or (inter is not None and inter != 0.0)
            if scaled and not volumes.flags.writeable:  # float32 voxels read from a .gz
                volumes = volumes.copy()
            if slope is not None and slope != 1.0:
                volumes *= np.float32(slope)
            if inter is not None and inter != 0.0:
                volumes += np.float32(inter)
            affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Quarantine:
        raise
    except MemoryError as exc:
        raise Quarantine("too_large", "volume does not fit in memory") from exc
    except (EOFError, OSError) as exc:  # a short read: the voxel data ends early
        raise Quarantine("truncated", "the file ends before its voxel data") from exc
    except Exception as exc:  # nibabel raises many types for bad files
        raise Quarantine("unreadable", f"NIfTI load failed ({type(exc).__name__})") from exc
    if volumes.ndim == 3:
        volumes = volumes[..., None]
    return volumes, affine


def patient_of(path: Path) -> str:
    """The patient a NIfTI file is taken to belong to (module docstring, "Identity")."""
    return _patient(Path(path))


def read_nifti(path: Path, *, axis: str = "axial",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Slice]:
    """Yield the 2-D slices of a NIfTI volume along ``axis`` (see module docstring).

    ``pixels`` are float32 ``[rows, columns]`` in the file's scaled units; ``pixel_spacing``
    is (row, column) in mm from the affine. The whole volume is loaded, so the whole volume
    counts against ``max_pixels`` (``budget``): over it, ``too_large`` before any voxel is
    read.
    """
    path = Path(path)
    cut = AXIS_INDEX[axis]
    volumes, spacing = _load_ras(path, max_pixels)
    if volumes.size == 0 or 0 in volumes.shape:
        raise Quarantine("empty_volume", "the volume has no voxels")
    if not np.isfinite(volumes).any():
        raise Quarantine("empty_volume", "the volume has no finite values")
    in_plane = [a for a in range(3) if a != cut]
    # After the transpose rows run along the second in-plane axis, columns along the first.
    row_mm, col_mm = float(spacing[in_plane[1]]), float(spacing[in_plane[0]])
    pixel_spacing = (row_mm, col_mm) if row_mm > 0 and col_mm > 0 else None
    patient = _patient(path)
    n_vol = volumes.shape[0]
    for t in range(n_vol):
        volume = volumes[t]
        for k in range(volume.shape[cut]):
            # Basic indexing: a view. (np.take would copy the whole strided volume per slice.)
            plane = volume[(slice(None),) * cut + (k,)]
            pixels = np.ascontiguousarray(plane[::-1, ::-1].T)
            where = f"{path}#volume={t},{axis}={k}" if n_vol > 1 else f"{path}#{axis}={k}"
            yield Slice(
                pixels=pixels,
                patient_id=patient,
                source=where,
                modality=None,
                pixel_spacing=pixel_spacing,
                slice_index=k,
            )
