"""``medssl shard --volumes``: one sample per 3-D volume, resampled to RAS at ``--spacing``.

Inputs. A NIfTI file is one volume (a 4-D file: one volume per index along its 4th axis,
``#volume=t`` in the key's source, since separate volumes there are separate contrasts or
time points). DICOM files are grouped into series from their headers and checked
(``dicom_series``: sorted by position along the slice normal, quarantined with a reason when
slices are missing, uneven, mixed ...), before any voxel is read; one series is one input,
reported under its folder (or its first file when the folder holds more) with its slice
count. Plain images (PNG/JPEG/TIFF) are ``not_a_volume``; a file whose header cannot be read
gets its own report line.

Voxels. Each slice is decoded by the 2-D DICOM reader (``dicom.read_dicom``: the modality LUT,
MONOCHROME1, the burned-in-text policy), so a volume holds the same modality units its slices
would; NIfTI voxels are the file's scaled values. The volume and its affine (DICOM's LPS
flipped to RAS: x and y negated) become a MONAI ``MetaTensor``; ``Orientation(axcodes="RAS")``
permutes and flips it, and ``Spacing(pixdim=spacing, mode="bilinear", diagonal=True)``
resamples it onto a world-aligned grid (``diagonal=True``: an oblique acquisition lands on
true RAS axes, not the closest permutation of its own). ``--spacing native`` keeps each
volume's voxel size (reorientation only). Integer-valued sources (CT in HU) are rounded back
to integers after the bilinear resampling, so they store losslessly with slope 1 as in 2-D:
the fractions dropped are below a hounsfield unit, far below CT noise.

Cost. A volume worker imports torch and MONAI: measured here, about 0.54 GB of anonymous
memory and 0.39 GB of shared library pages per process, and ~5 s of CPU to import (MONAI
imports all of its submodules); the parent already holds torch (WebDataset's import). Each
worker has one volume in hand (one task at a time, ``worker.iter_results``). Measured on a
512 x 512 x 200 CT resampled from 0.7 x 0.7 x 1.25 mm to 1.5 x 1.5 x 2 mm: peak 1.0 GB above
the imports (about 20 bytes per source voxel: the float32 stack, MONAI's flipped copy, the
resampling grid and output) and 5.5 s of one core. So a volume worker needs ~2 GB at the
default ``--max-pixels`` (2**26 voxels), against under 1 GB for 2-D.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medssl.data.quarantine import Quarantine, muted_loggers
from medssl.data.sample import Slice
from medssl.errors import ConfigError

NATIVE = "native"
#: The issue's default: 1.5 mm in-plane, 2 mm between slices (a common CT SSL grid).
DEFAULT_SPACING = "1.5,1.5,2.0"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: What ``dicom._silenced`` mutes, held once around a whole series (see ``muted_loggers``).
_DECODER_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle")


def parse_spacing(text: str | None) -> tuple[float, float, float] | None:
    """``"X,Y,Z"`` (mm, three positive numbers, or one for all axes) or ``native`` -> None."""
    text = (text or DEFAULT_SPACING).strip()
    if text.lower() == NATIVE:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"--spacing {text}: give three positive voxel sizes in mm, x,y,z "
                          f"(e.g. {DEFAULT_SPACING}), or 'native'")
    return values[0], values[1], values[2]


def _single_thread() -> None:
    """In a spawned shard worker, torch must not start a thread per core: the workers are
    the parallelism (``--workers``), and N workers x N threads thrash."""
    import torch

    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)


def resample(volume: np.ndarray, affine: np.ndarray, pixdim: tuple[float, float, float] | None,
             with_affine: bool = False) -> tuple:
    """``volume`` float32 ``[X, Y, Z]`` with its voxel -> RAS mm ``affine`` -> (float32
    ``[X', Y', Z']`` on RAS axes at ``pixdim`` mm -- the native voxel size when None --,
    its voxel size[, its affine when ``with_affine``]). Integer-valued input comes back rounded
    to integers. The shard keeps the voxel size only: where the grid sits in the scanner's
    frame says nothing a model needs, and an origin is one more thing to leak."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    _single_thread()
    finite = np.isfinite(volume)
    integral = bool(finite.all()) and bool(np.all(np.mod(volume, 1) == 0))
    del finite
    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(volume, np.float32)[None]),
                       affine=torch.as_tensor(affine, dtype=torch.float64))
    # labels given: MONAI's default is changing to "the tensor's space"; ours is always RAS.
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    image = Spacing(pixdim=pixdim if pixdim is not None else (-1.0, -1.0, -1.0),
                    mode="bilinear", diagonal=True, dtype=torch.float32)(image)
    out_affine = image.affine.numpy()
    out = np.ascontiguousarray(image.as_tensor().numpy()[0], dtype=np.float32)
    del image
    if integral:
        np.rint(out, out=out)
    spacing = tuple(round(float(v), 6) for v in np.linalg.norm(out_affine[:3, :3], axis=0))
    return (out, spacing, out_affine) if with_affine else (out, spacing)


# ------------------------------------------------------------------ reading (worker side)

def read_volumes(item, job) -> Iterator[Slice]:
    """The volume samples of one input (``worker.InputItem``): a DICOM series (``item.files``)
    or a NIfTI file. Pixels are float32 ``[X, Y, Z]`` RAS in modality units; ``spacing`` set."""
    if item.files:
        yield _series_volume(item, job)
    else:
        yield from _nifti_volumes(item, job)


def _series_volume(item, job) -> Slice:
    affine = _LPS_TO_RAS @ np.asarray(item.geometry, dtype=np.float64).reshape(4, 4)
    with muted_loggers(*_DECODER_LOGGERS):  # once per series, not twice per slice
        volume, first = _stack(item, job)
    out, spacing = resample(volume, affine, job.spacing)
    del volume
    first.pixels, first.spacing = out, spacing
    first.pixel_spacing = first.slice_index = None
    first.source = item.path
    return first


def _stack(item, job) -> tuple[np.ndarray, Slice]:
    """The series' slices, decoded in order, as float32 ``[columns, rows, slices]``, and the
    first slice (whose identity and codes the volume takes)."""
    from medssl.data.dicom import read_dicom

    volume = None
    first: Slice | None = None
    for k, path in enumerate(item.files):
        frames = list(read_dicom(Path(path), allow_burned_in=job.allow_burned_in,
                                 max_pixels=job.max_pixels))
        if len(frames) != 1:  # planning refused multi-frame headers; the file disagrees
            raise Quarantine("multiframe", "multi-frame files are not read as volumes")
        s = frames[0]
        if s.pixels.ndim != 2:
            raise Quarantine("not_grayscale", "colour slices are not read as volumes")
        if volume is None:
            first = s
            volume = np.empty((s.pixels.shape[1], s.pixels.shape[0], len(item.files)),
                              np.float32)
        elif s.pixels.shape != (volume.shape[1], volume.shape[0]):
            raise Quarantine("mixed_dimensions", "slices differ in rows/columns")
        volume[:, :, k] = s.pixels.T  # vol[column, row, slice], as the affine says
    return volume, first


def _nifti_volumes(item, job) -> Iterator[Slice]:
    from medssl.data import dicom_series, nifti

    path = Path(item.path)
    header = nifti.read_header(path)
    shape = tuple(int(d) for d in header.get_data_shape())
    if job.spacing is not None and len(shape) in (3, 4):
        from medssl.data import budget

        out = dicom_series.resampled_shape(np.asarray(header.get_best_affine()), shape[:3],
                                           job.spacing)
        budget.check_pixels(budget.pixel_cost(*out), job.max_pixels,
                            f"the volume resampled to {'x'.join(map(str, out))} voxels")
    volumes, affine = nifti.load_scaled(path, header, job.max_pixels)
    if 0 in volumes.shape:
        raise Quarantine("empty_volume", "the volume has no voxels")
    patient = nifti.patient_of(path)
    n_vol = volumes.shape[3]
    for t in range(n_vol):
        volume = np.ascontiguousarray(volumes[..., t])
        if not np.isfinite(volume).any():
            raise Quarantine("empty_volume", "the volume has no finite values")
        out, spacing = resample(volume, affine, job.spacing)
        del volume
        yield Slice(pixels=out, patient_id=patient, spacing=spacing,
                    source=f"{path}#volume={t}" if n_vol > 1 else str(path))
