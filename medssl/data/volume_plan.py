"""``medssl shard --volumes``, parent side: discovered files or manifest rows -> one input per
volume, decided from headers before any voxel is decoded (``volumes`` reads them).

A NIfTI file is one input. DICOM files are read for their headers (on ``--workers`` processes,
in one pass over every file of the run), grouped into series and judged
(``dicom_series``); each series becomes one input named by its folder when it has the folder
to itself (else by its first file), with its sorted slice files and LPS affine. A file whose
header cannot be used is an input of its own, quarantined, so the report names it; a plain
image is ``not_a_volume``. With a recipe's manifest, a row names one volume: a NIfTI file or
a folder holding exactly one series (``multiple_series`` otherwise).
"""

from __future__ import annotations

from pathlib import Path

from medssl.data import dicom_series, readers
from medssl.data.quarantine import muted_loggers

#: What ``dicom._silenced`` mutes, held once around the whole header pass.
_DECODER_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle")


def _classify(found) -> tuple[list[dict], list[str]]:
    """(inputs decided without a header, DICOM candidates) of discovered files."""
    inputs: list[dict] = []
    dicoms: list[str] = []
    for f in found:
        name = f.path.name.lower()
        if f.problem:
            inputs.append({"path": str(f.path), "quarantine": f.problem})
        elif name.endswith(readers.NIFTI_SUFFIXES):
            inputs.append({"path": str(f.path)})
        elif name.endswith(readers.IMAGE_SUFFIXES):
            inputs.append({"path": str(f.path), "quarantine": "not_a_volume",
                           "detail": "a 2-D image; --volumes reads DICOM series and NIfTI"})
        elif name.endswith(readers.DICOM_SUFFIXES) or readers.has_dicom_preamble(f.path):
            dicoms.append(str(f.path))
        else:
            inputs.append({"path": str(f.path), "quarantine": "unsupported_format"})
    return inputs, dicoms


def _headers(dicoms: list[str], max_pixels: int, workers: int) -> list:
    with muted_loggers(*_DECODER_LOGGERS):  # consumed whole here: never held across a yield
        return list(dicom_series.read_headers(dicoms, max_pixels, workers))


def _series_inputs(headers: list, dicoms: list[str], pixdim, max_pixels: int) -> list[dict]:
    """One input per series (and per unusable header) among ``headers``."""
    series, bad = dicom_series.group_series(headers)
    inputs = [{"path": h.path, "quarantine": h.problem} for h in bad]
    per_folder: dict[str, int] = {}
    for p in dicoms:
        parent = str(Path(p).parent)
        per_folder[parent] = per_folder.get(parent, 0) + 1
    for s in series:
        s = dicom_series.check_budget(s, pixdim, max_pixels)
        folder = str(Path(s.files[0]).parent)
        alone = all(str(Path(p).parent) == folder for p in s.files) \
            and per_folder.get(folder) == len(s.files)
        entry = {"path": folder if alone else s.files[0], "files": tuple(s.files),
                 "quarantine": s.reason, "detail": s.detail}
        if s.reason is None:
            entry["geometry"] = tuple(float(v) for v in dicom_series.lps_affine(s).ravel())
        inputs.append(entry)
    return inputs


def plan(found, pixdim, max_pixels: int, workers: int) -> list[dict]:
    """Discovered files (``readers.Found``) -> one input per volume, as InputItem keyword
    dicts (``path``, ``files``, ``geometry``, ``quarantine``, ``detail``), sorted by path."""
    inputs, dicoms = _classify(found)
    inputs += _series_inputs(_headers(dicoms, max_pixels, workers), dicoms, pixdim, max_pixels)
    return sorted(inputs, key=lambda e: Path(e["path"]).as_posix())


def plan_rows(paths: list[Path], pixdim, max_pixels: int, workers: int) -> list[dict]:
    """One input per manifest row (module docstring), in row order; every row's DICOM
    headers are read in one pass."""
    rows: list[tuple[list[dict], list[str]] | dict] = []
    for path in paths:
        path = Path(path)
        if path.is_file() and path.name.lower().endswith(readers.NIFTI_SUFFIXES):
            rows.append({"path": str(path)})
        elif path.is_dir():
            rows.append(_classify(readers.discover([path])))
        else:
            rows.append({"path": str(path), "quarantine": "not_a_volume",
                         "detail": "a manifest row names a NIfTI file or a DICOM series folder"})
    every = [d for row in rows if isinstance(row, tuple) for d in row[1]]
    headers = iter(_headers(every, max_pixels, workers))
    out = []
    for path, row in zip(paths, rows):
        if isinstance(row, dict):
            out.append(row)
            continue
        others, dicoms = row
        planned = others + _series_inputs([next(headers) for _ in dicoms], dicoms, pixdim,
                                          max_pixels)
        volumes = [p for p in planned if p.get("files") or p.get("quarantine") is None]
        if len(volumes) > 1:
            out.append({"path": str(path), "quarantine": "multiple_series",
                        "detail": f"the folder holds {len(volumes)} volumes; name one per row"})
        elif volumes:
            out.append({**volumes[0], "path": str(path)})
        else:
            reason = planned[0]["quarantine"] if planned else "no_images"
            out.append({"path": str(path), "quarantine": reason})
    return out
