"""Open a DICOM file without trusting it: truncation, bounded inflation, frames from disk.

``dicom.read_dicom`` turns a dataset into slices; this module gets the dataset and its pixel
frames into memory safely, whatever the file claims:

* **Truncation.** pydicom does not complain about a file cut inside its header: a value cut
  short comes back short, a partial tag ends the data set, and the image then looks like one
  with no pixel data. The file is read through ``_CutFile``, which notes any read that stops
  short of what was asked, and every top-level element is checked to end inside the file.
* **Deflated transfer syntax.** pydicom's ``dcmread`` inflates the whole data set with one
  ``zlib.decompress`` before parsing it, so a 778 KB file can claim (and get) gigabytes. Here
  the data set is inflated incrementally and refused as ``too_large`` past
  ``budget.inflate_cap``, before pydicom sees it.
* **Frames from disk.** Pixel data over ``DEFER_SIZE`` is not loaded with the header; frames
  are decoded from the file one at a time (pydicom's decoders accept a file positioned at the
  pixel data), so a multi-gigabyte multi-frame file costs one frame of memory.

The three pydicom helpers used below (``read_preamble``, ``_read_file_meta_info``,
``read_dataset``) are the ones pydicom's own ``iter_pixels`` builds on; the private one is
pinned by the tests of deflated files.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from medssl.data import budget
from medssl.data.quarantine import Quarantine

DEFLATED = "1.2.840.10008.1.2.1.99"
#: Elements larger than this stay on disk until needed (pixel data, big private blobs).
DEFER_SIZE = 1 << 20
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED = 0xFFFFFFFF


class _Tracked:
    """Mixin for a binary file object: ``cut`` turns True when a read stops short.

    A read that returns some but not all of the bytes asked for, or any read after a seek
    past the end (how pydicom skips a deferred value), means the file ends inside an
    element. A read of nothing exactly at the end is a clean end of the data set.
    """

    cut = False
    _end = 0

    def read(self, size=-1, /):
        pos = self.tell()
        data = super().read(size)
        if size is not None and size > 0 and (0 < len(data) < size or pos > self._end):
            self.cut = True
        return data


class _CutFile(_Tracked, io.BufferedReader):
    """A buffered file that tracks short reads (a buffered read of a regular file is short
    only at its end). pydicom reopens deferred values with ``type(f)(name, "rb")``."""

    def __init__(self, name, mode="rb") -> None:
        super().__init__(io.FileIO(name, mode))
        self._end = os.fstat(self.fileno()).st_size


class _CutBytes(_Tracked, io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._end = len(data)


def _overruns(ds, end: int) -> bool:
    """True when a top-level element's declared value runs past the end of the data."""
    from pydicom.dataelem import RawDataElement

    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts every element
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED:
            continue
        if raw.value is None:  # deferred: still on disk
            if raw.value_tell + raw.length > end:
                return True
        elif len(raw.value) < raw.length:
            return True
    return False


def _meta_cut(file_meta, end: int) -> bool:
    """True when the File Meta group is cut: its elements, or the length it declares
    (from byte 132, the 12-byte group length element plus its value), run past the end."""
    if not len(file_meta):
        return False
    if _overruns(file_meta, end):
        return True
    declared = file_meta.get("FileMetaInformationGroupLength")
    try:
        return declared is not None and 132 + 12 + int(declared) > end
    except (TypeError, ValueError):
        return False


def _inflate(f, cap: int) -> bytes:
    """The raw-deflate stream from ``f``'s position, inflated; ``too_large`` past ``cap``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        while not inflater.eof:
            chunk = inflater.unconsumed_tail or f.read(1 << 20)
            # At most 16 MiB per step: one step's output must not itself be the bomb.
            step = inflater.decompress(chunk, min(cap + 1 - len(out), 1 << 24))
            if not chunk and not step:  # end of file, nothing pending inside zlib
                raise Quarantine("truncated", "the deflated data set ends early")
            out += step
            if len(out) > cap:
                raise Quarantine("too_large", f"the deflated data set inflates past {cap:,} "
                                              "bytes (see --max-pixels)")
    except zlib.error as exc:
        raise Quarantine("unreadable", "the deflated data set is corrupt") from exc
    return bytes(out)


def _read_deflated(f, path: Path, preamble, file_meta, max_pixels: int):
    """A FileDataset for a deflated file, inflated under the budget (as pydicom would)."""
    from pydicom.dataset import FileDataset
    from pydicom.filereader import read_dataset

    inflated = _CutBytes(_inflate(f, budget.inflate_cap(max_pixels)))
    dataset = read_dataset(inflated, is_implicit_VR=False, is_little_endian=True)
    inflated.close()  # the elements hold copies; ``cut`` and ``_end`` stay readable
    ds = FileDataset(str(path), dataset, preamble, file_meta, is_implicit_VR=False,
                     is_little_endian=True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds, inflated


def open_dataset(path: Path, max_pixels: int):
    """The data set of ``path`` with pixel data left on disk when large.

    Raises Quarantine: ``truncated`` (the file ends inside an element), ``unreadable`` (not
    DICOM, or a header pydicom cannot parse), ``too_large`` (a deflated file inflating past
    the budget). Call inside ``dicom._silenced()``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_preamble

    force = path.name.lower().endswith((".dcm", ".dicom"))
    preamble, meta_cut = None, False
    try:
        f = _CutFile(path)
    except OSError as exc:
        raise Quarantine("unreadable", f"cannot open the file ({type(exc).__name__})") from exc
    source: _Tracked = f
    try:
        preamble = read_preamble(f, force)
        file_meta = _read_file_meta_info(f)
        meta_cut = f.cut  # before inflation, whose last chunk read is short by nature
        if str(file_meta.get("TransferSyntaxUID", "")) == DEFLATED:
            ds, source = _read_deflated(f, path, preamble, file_meta, max_pixels)
        else:
            f.seek(0)
            ds = pydicom.dcmread(f, defer_size=DEFER_SIZE, force=force)
    except Quarantine:
        raise
    except InvalidDicomError as exc:
        raise Quarantine("unreadable", "not a DICOM file") from exc
    except Exception as exc:  # pydicom raises many types for bad headers
        if (source.cut or isinstance(exc, EOFError)) and preamble is not None:
            raise Quarantine("truncated", "the file ends inside its header") from exc
        raise Quarantine("unreadable", f"header parse failed ({type(exc).__name__})") from exc
    finally:
        f.close()
    # force=True parses anything named .dcm, even an empty or random file, into "a dataset";
    # one with none of the attributes every image has is not DICOM at all.
    looks_dicom = any(k in ds for k in ("SOPClassUID", "Modality", "Rows", *PIXEL_KEYWORDS))
    cut = source.cut or meta_cut or _overruns(ds, source._end) or _meta_cut(file_meta, f._end)
    if preamble is not None and not len(ds):
        cut = True  # a Part 10 file ("DICM" at byte 128) always has a data set after its meta
    if cut and (preamble is not None or looks_dicom):
        raise Quarantine("truncated", "the file ends inside an element")
    if not looks_dicom:
        raise Quarantine("unreadable", "not a DICOM image" if preamble is not None
                         else "not a DICOM file")
    return ds


def pixel_keyword(ds) -> str | None:
    """The one pixel data attribute ``ds`` holds, or None."""
    found = [k for k in PIXEL_KEYWORDS if k in ds]
    return found[0] if len(found) == 1 else None


def check_budget(ds, max_pixels: int) -> None:
    """``too_large`` when one decoded frame would exceed the budget (header values only)."""
    def whole(keyword: str, default: int) -> int:
        value = ds.get(keyword)
        try:
            return int(value) if value is not None else default
        except (TypeError, ValueError):
            return default

    rows, cols = whole("Rows", 0), whole("Columns", 0)
    samples = whole("SamplesPerPixel", 1)
    bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(pixel_keyword(ds) or "",
                                                                    whole("BitsAllocated", 16))
    if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
        samples, bits = 3, 16  # each index becomes three 16-bit lookup-table values
    budget.check_pixels(budget.pixel_cost(rows, cols, samples, bits=bits), max_pixels,
                        f"a {rows}x{cols}x{samples} frame of {bits}-bit values")


def check_length(ds, path: Path) -> None:
    """``truncated`` when native pixel data holds fewer bytes than the header needs."""
    from pydicom.dataelem import RawDataElement
    from pydicom.pixels.utils import get_expected_length

    keyword = pixel_keyword(ds)
    if keyword is None:
        return
    raw = ds.get_item(keyword, keep_deferred=True)
    if isinstance(raw, RawDataElement):
        if raw.length == _UNDEFINED:
            return
        have = raw.length if raw.value is None else len(raw.value)
        if raw.value is None:
            have = min(have, os.path.getsize(path) - raw.value_tell)
    else:
        have = len(raw.value)
    try:
        want = get_expected_length(ds, "bytes")
    except Exception as exc:
        raise Quarantine("undecodable", f"pixel data unreadable ({type(exc).__name__})") from exc
    if have < want:
        raise Quarantine("truncated", f"pixel data has {have} of {want} bytes")


def iter_frames(ds, path: Path, ts: str, decoder) -> Iterator[tuple]:
    """``(array, properties)`` per frame, decoded one at a time.

    Pixel data left on disk is read frame by frame from ``path`` (pydicom's decoders take a
    file positioned at the value), so only one frame is ever in memory.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.pixels import as_pixel_options
    from pydicom.uid import UID

    keyword = pixel_keyword(ds)
    raw = ds.get_item(keyword, keep_deferred=True) if keyword else None
    opts = as_pixel_options(ds)
    if isinstance(raw, RawDataElement) and raw.value is None:
        with open(path, "rb") as f:
            f.seek(raw.value_tell)
            opts.update(transfer_syntax_uid=UID(ts), pixel_keyword=keyword)
            if raw.VR is not None:
                opts["pixel_vr"] = str(raw.VR)
            yield from decoder.iter_array(f, validate=True, **opts)
        return
    yield from decoder.iter_array(ds, validate=True, **opts)
