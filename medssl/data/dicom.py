"""DICOM file -> 2-D slices in modality units, one frame at a time.

pydicom does the decoding (native, deflated, RLE, JPEG, JPEG-LS and JPEG 2000 through its
pylibjpeg/openjpeg/pillow plugins) and the colour work (YBR -> RGB, palette expansion, the
modality LUT). This module decides what to do with the result:

* grayscale frames get the modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence,
  including the Enhanced multi-frame functional groups, which pydicom's helper does not read);
  the result stays integer when slope and intercept are integral (lossless in the shard),
  float32 otherwise;
* MONOCHROME1 is inverted in modality units, ``value -> lo + hi - value`` where ``lo``/``hi``
  are the ends of the range BitsStored/PixelRepresentation allow, mapped through the modality
  LUT: the same mapping for every frame and file of a series, not a per-frame min/max; the
  window centre is mirrored the same way;
* colour frames come out as uint8 RGB ``[H, W, 3]`` (16- and 32-bit samples scaled down,
  palette alpha dropped).

Only allow-listed attributes leave this module (see ``sample.Slice``); raw patient/study/series
identifiers travel in the Slice so the writer can pseudonymise them, and go no further; so do
the raw ``ATTRIBUTE_SOURCES`` strings (in ``Slice.extra``, never written), which the writer
coarsens into subgroup attributes only when ``medssl shard --attributes`` asks.

Files quarantined unless ``allow_burned_in``: BurnedInAnnotation == YES; Secondary Capture
SOP classes (1.2.840.10008.5.1.4.1.1.7 and its .1-.4 subclasses) or any ConversionType
(screenshots and scanned documents carry burned-in names); ultrasound whose
BurnedInAnnotation is not explicitly NO (ultrasound screens nearly always print the patient
name). Always quarantined: segmentations, dose grids and other non-image objects.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data import dicom_file
from medssl.data.budget import DEFAULT_MAX_PIXELS
from medssl.data.quarantine import Quarantine, muted_loggers
from medssl.data.sample import Slice
from medssl.io import sha256_file

SECONDARY_CAPTURE_ROOT = "1.2.840.10008.5.1.4.1.1.7"
#: Objects with pixel data that are not pictures of anatomy (masks, dose grids, ...).
NOT_IMAGE_MODALITIES = {"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO",
                        "REG", "DOC", "ECG", "HD", "RWV"}
#: Header elements behind the subgroup attributes (``medssl.data.attributes.header_attributes``):
#: handed over raw in ``Slice.extra`` (never written); stored only coarsened, and only when asked.
ATTRIBUTE_SOURCES = ("PatientSex", "PatientAge", "PatientBirthDate", "StudyDate",
                     "InstitutionName", "StationName", "Manufacturer", "ManufacturerModelName")
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"


@contextmanager
def _silenced() -> Iterator[None]:
    """pydicom reports invalid values by quoting them (names, dates) to both ``warnings`` and
    its logger; nothing from a header may reach a log, so value validation, warnings and the
    decoder loggers are off while we touch a dataset. Never held across a ``yield``."""
    from pydicom import config

    with muted_loggers("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle"), \
            warnings.catch_warnings(), config.disable_value_validation():
        warnings.simplefilter("ignore")
        yield


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
        if value is None:
            return None
    text = str(value).strip()
    return text or None


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if not len(value):
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _group_value(ds, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` from the frame's functional group ``sequence``, else shared, else top level.

    Enhanced CT/MR/XA files keep spacing, rescale and window inside
    Per-frame/Shared Functional Groups rather than at the top level.
    """
    for groups_kw in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(groups_kw)
        if not groups:
            continue
        item = groups[frame] if groups_kw.startswith("PerFrame") and frame < len(groups) else groups[0]
        seq = item.get(sequence)
        if seq:
            value = seq[0].get(keyword)
            if value is not None:
                return value
    return ds.get(keyword)


def _transfer_syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return str(ts)
    # A file without File Meta (read with force): its encoding is what the parser saw.
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        raise Quarantine("unsupported_transfer_syntax", "no Transfer Syntax UID and unknown encoding")
    from pydicom.uid import UID

    ts = _IMPLICIT_LE if implicit else (_EXPLICIT_LE if little else _EXPLICIT_BE)
    ds.file_meta.TransferSyntaxUID = UID(ts)
    return ts


def patient_identity(ds, path: Path) -> str:
    """The raw identity pseudonyms are built from: PatientID, PatientName, StudyInstanceUID,
    else the file's content hash (each such file then counts as its own patient)."""
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID"):
        value = _text(ds.get(keyword))
        # An emptied PersonName reads as "^^^^": no identity in it.
        if value and value.strip("^= "):
            return value
    return "sha256:" + sha256_file(path)


def check_policy(ds, allow_burned_in: bool) -> None:
    """Raise Quarantine for objects that are not images or may show burned-in text."""
    modality = (_text(ds.get("Modality")) or "").upper()
    if modality in NOT_IMAGE_MODALITIES:
        raise Quarantine("not_an_image", f"modality {modality} is not an image of anatomy")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise Quarantine("no_pixel_data", "the file has no pixel data")
    if allow_burned_in:
        return
    burned = (_text(ds.get("BurnedInAnnotation")) or "").upper()
    if burned == "YES":
        raise Quarantine("burned_in_annotation",
                         "BurnedInAnnotation is YES; check the pixels, then --allow-burned-in")
    sop = _text(ds.get("SOPClassUID")) or ""
    if sop == SECONDARY_CAPTURE_ROOT or sop.startswith(SECONDARY_CAPTURE_ROOT + ".") \
            or "ConversionType" in ds:
        raise Quarantine("secondary_capture",
                         "secondary capture (screenshot/scan) may show burned-in text; "
                         "check the pixels, then --allow-burned-in")
    if modality in ("US", "IVUS") and burned != "NO":
        raise Quarantine("ultrasound_burned_in",
                         "ultrasound not marked BurnedInAnnotation=NO usually shows the patient's "
                         "name; check the pixels, then --allow-burned-in")


def _stored_range(ds) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _modality_lut(arr: np.ndarray, ds, frame: int) -> np.ndarray:
    """Stored values -> modality units, integer when the rescale is integral."""
    if arr.dtype.kind == "f":  # Float Pixel Data is already in real-world units
        return arr.astype(np.float32, copy=False)
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        return apply_modality_lut(arr, ds)
    slope = _number(_group_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _number(_group_value(ds, frame, "PixelValueTransformationSequence",
                                     "RescaleIntercept"))
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    if slope == 1.0 and intercept == 0.0:
        return arr
    if slope.is_integer() and intercept.is_integer():
        wide = np.int64 if arr.dtype.itemsize >= 4 else np.int32
        return arr.astype(wide) * int(slope) + int(intercept)
    return (arr.astype(np.float64) * slope + intercept).astype(np.float32)


def _mirror(pixels: np.ndarray, total: float) -> np.ndarray:
    """``total - pixels`` (MONOCHROME1), in place and in the narrowest integer type that
    holds the result: a large frame must not pass through int64 (8 bytes a pixel)."""
    if pixels.dtype.kind == "f":
        if not pixels.flags.writeable:
            pixels = pixels.copy()
        return np.subtract(np.float32(total), pixels, out=pixels)
    lo, hi = int(pixels.min()), int(pixels.max())
    bound = max(abs(lo), abs(hi), abs(int(total) - lo), abs(int(total) - hi))
    out = pixels.astype(np.int32 if bound < 2**31 else np.int64)
    return np.subtract(int(total), out, out=out)


def _to_rgb8(arr: np.ndarray, max_value: int) -> np.ndarray:
    rgb = arr[..., :3]
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    # In blocks of rows: float64 over a whole large frame would cost 24 bytes a pixel.
    out = np.empty(rgb.shape, np.uint8)
    step = max(1, (1 << 20) // max(1, rgb.shape[1] * rgb.shape[2]))
    scale = 255.0 / max_value
    for r in range(0, rgb.shape[0], step):
        block = rgb[r:r + step].astype(np.float64) * scale
        out[r:r + step] = np.clip(np.rint(block), 0, 255)
    return out


def _colour(arr: np.ndarray, photometric: str, ds) -> np.ndarray:
    """A decoded colour frame -> uint8 RGB ``[H, W, 3]``."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _to_rgb8(rgb, 65535 if rgb.dtype == np.uint16 else 255)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric != "RGB":
        raise Quarantine("undecodable", f"colour space {photometric} is not supported")
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    return _to_rgb8(arr, (1 << min(bits, arr.dtype.itemsize * 8)) - 1)


def _spacing(ds, frame: int) -> tuple[float, float] | None:
    value = _group_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    if value is None:
        value = ds.get("ImagerPixelSpacing")
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0):
        return None
    return row, col


def _window(ds, frame: int) -> tuple[float, float] | None:
    center = _number(_group_value(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
    width = _number(_group_value(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return center, width


def read_dicom(path: Path, *, allow_burned_in: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Slice]:
    """Yield each frame of a DICOM file as a Slice (see module docstring for the rules).

    Grayscale ``pixels`` are ``[rows, columns]`` in modality units (HU for CT); colour are
    uint8 ``[rows, columns, 3]``. ``pixel_spacing`` is (row, column) in mm. A frame over
    ``max_pixels`` (``budget``) is refused as ``too_large`` from the header, before any
    pixel is read; frames are decoded one at a time.
    """
    path = Path(path)
    with _silenced():
        ds = dicom_file.open_dataset(path, max_pixels)
        check_policy(ds, allow_burned_in)
        dicom_file.check_budget(ds, max_pixels)
        ts = _transfer_syntax(ds)
        decoder = _decoder(ds, ts, path)
        base = _identity_and_codes(ds, path)
        header = {k: _text(ds.get(k)) for k in ATTRIBUTE_SOURCES}
        n_frames = int(_number(ds.get("NumberOfFrames")) or 1)
        instance = _number(ds.get("InstanceNumber"))
    mono1_range: list[tuple[float, float]] = []

    try:
        with _silenced():
            frames = dicom_file.iter_frames(ds, path, ts, decoder)
        for index in range(n_frames):
            with _silenced():
                try:
                    arr, props = next(frames)
                except StopIteration:
                    break
                s = _frame_slice(ds, arr, props, index, n_frames, instance, mono1_range)
                del arr  # the decoded frame is not needed while the consumer works
            s.source = f"{path}#frame={index}" if n_frames > 1 else str(path)
            for key, value in base.items():
                setattr(s, key, value)
            s.extra["transfer_syntax"] = ts
            s.extra["header"] = header  # raw: only data.attributes' coarsened values are kept
            yield s
    except Quarantine:
        raise
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError,
            IndexError, TypeError, EOFError, OSError) as exc:
        raise Quarantine("undecodable", f"pixel data failed to decode ({type(exc).__name__})") from exc


def _decoder(ds, ts: str, path: Path):
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise Quarantine("unsupported_transfer_syntax", "no decoder for this transfer syntax") from exc
    if not decoder.is_available:
        raise Quarantine("unsupported_transfer_syntax", "decoder plugin for this syntax not installed")
    if decoder.is_native:
        dicom_file.check_length(ds, path)
    return decoder


def _identity_and_codes(ds, path: Path) -> dict[str, Any]:
    modality = _text(ds.get("Modality"))
    return {
        "patient_id": patient_identity(ds, path),
        "study_id": _text(ds.get("StudyInstanceUID")),
        "series_id": _text(ds.get("SeriesInstanceUID")),
        "modality": modality.upper() if modality else None,
        "body_part": _text(ds.get("BodyPartExamined")),
        "view": _text(ds.get("ViewPosition")),
        "unit": "HU" if (modality or "").upper() == "CT" else None,
    }


def _frame_slice(ds, arr: np.ndarray, props: dict, index: int, n_frames: int,
                 instance: float | None, mono1_range: list[tuple[float, float]]) -> Slice:
    """One decoded frame -> Slice with pixels, spacing, window and index (identity added later).

    ``mono1_range`` caches the MONOCHROME1 mirror range across frames (one-element list).
    """
    if not arr.dtype.isnative:  # big-endian files decode to big-endian arrays
        arr = arr.astype(arr.dtype.newbyteorder("="))
    photometric = str(props.get("photometric_interpretation", "")).strip()
    window = _window(ds, index)
    if arr.ndim == 3 or photometric == "PALETTE COLOR":
        pixels = _colour(arr, photometric, ds)
        window = None
    else:
        pixels = _modality_lut(arr, ds, index)
        if photometric == "MONOCHROME1":
            if not mono1_range:
                ends = _modality_lut(np.array(_stored_range(ds), dtype=np.int64), ds, index)
                mono1_range.append((float(np.min(ends)), float(np.max(ends))))
            total = mono1_range[0][0] + mono1_range[0][1]
            pixels = _mirror(pixels, total)
            if window is not None:
                window = (total - window[0], window[1])
    if n_frames > 1:
        slice_index: int | None = index
    else:
        slice_index = int(instance) if instance is not None else None
    return Slice(
        pixels=pixels,
        patient_id="",
        source="",
        pixel_spacing=_spacing(ds, index),
        slice_index=slice_index,
        window=window,
        extra={"photometric": photometric},
    )
