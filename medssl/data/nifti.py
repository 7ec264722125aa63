"""NIfTI volume -> 2-D slices along an anatomical axis, whatever the file's affine.

MONAI's ``LoadImage`` (nibabel underneath) reads the volume; ``np.asanyarray(img.dataobj)``
inside it applies ``scl_slope``/``scl_inter``, so values are in the scanner's real units.
``Orientation(axcodes="RAS")`` then permutes and flips the array so that array axis 0 runs
left->Right, 1 posterior->Anterior, 2 inferior->Superior. "axial" therefore cuts along
axis 2, "coronal" along 1, "sagittal" along 0, for any acquisition orientation.

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

import functools
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medssl.data.readers import Quarantine, muted_loggers
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


@functools.cache
def _loader():
    """One MONAI loader per process (building it constructs every MONAI reader)."""
    from monai.transforms import LoadImage, Orientation

    # MONAI's DICOM readers warn about optional GPU codecs while being constructed; that is
    # noise for a NIfTI read. reader= pins nibabel so no other reader ever opens the file.
    with muted_loggers("monai"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")
    # labels pinned: MONAI is moving the default to the MetaTensor's "space", and "RAS" here
    # must keep meaning nibabel's RAS+ whatever that default becomes.
    return load, Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))


def _load_ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(volumes [T, X, Y, Z] float32 in RAS order, voxel size (x, y, z) in mm)``."""
    load, orientation = _loader()
    try:
        with warnings.catch_warnings(), muted_loggers("nibabel", "monai"):
            # nibabel/MONAI warnings can quote header text; the file is judged by what loads.
            warnings.simplefilter("ignore")
            img = load(str(path))
            if img.ndim != 4:
                raise Quarantine(
                    "unsupported_dimensions",
                    f"expected a 3-D or 4-D volume, got {img.ndim - 1} spatial dimensions",
                )
            img = orientation(img)
    except Quarantine:
        raise
    except MemoryError as exc:
        raise Quarantine("too_large", "volume does not fit in memory") from exc
    except EOFError as exc:
        raise Quarantine("truncated", "the file ends before its voxel data") from exc
    except Exception as exc:  # nibabel/MONAI raise many types for bad files
        raise Quarantine("unreadable", f"NIfTI load failed ({type(exc).__name__})") from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return np.asarray(img.detach().cpu().numpy(), dtype=np.float32), spacing


def read_nifti(path: Path, *, axis: str = "axial") -> Iterator[Slice]:
    """Yield the 2-D slices of a NIfTI volume along ``axis`` (see module docstring).

    ``pixels`` are float32 ``[rows, columns]`` in the file's scaled units; ``pixel_spacing``
    is (row, column) in mm from the affine.
    """
    path = Path(path)
    cut = AXIS_INDEX[axis]
    volumes, spacing = _load_ras(path)
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
            plane = np.take(volume, k, axis=cut)
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
