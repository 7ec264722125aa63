"""Hostile inputs for tests and benchmarks: small files that claim far more than they hold.

Each builder writes a file of a few hundred bytes to a few hundred kilobytes whose header
claims an image of gigabytes -- the "decompression bombs" ``medssl shard`` must refuse from
the header (``budget``) -- plus a large but legitimate multi-frame file that must still be
read, one frame at a time. Nothing here is used by the pipeline itself.

    rle_bomb        RLE Lossless DICOM, Rows = Columns = 60000, ~600 bytes
    deflate_bomb    Deflated Explicit VR DICOM of zeros, 20000 x 20000 in ~780 KB
    png_bomb        PNG whose IHDR claims 60000 x 60000, ~100 bytes
    nifti_bomb      .nii header claiming a 2000^3 volume, no voxels (352 bytes)
    multiframe      native multi-frame DICOM (a tomosynthesis-like stack), real pixels
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np


def _dataset(rows: int, cols: int, transfer_syntax: str, frames: int = 1, bits: int = 16):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, generate_uid

    sop = generate_uid(entropy_srcs=["medssl-hostile", str(rows), str(cols), str(frames)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
    ds.Modality, ds.PatientID, ds.BurnedInAnnotation = "CT", "HOSTILE-0001", "NO"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def rle_bomb(path: Path, rows: int = 60000, cols: int = 60000, frames: int = 1) -> Path:
    """An RLE Lossless DICOM whose frame(s) are a few replicate runs: decoding it would
    allocate ``rows * cols * 2`` bytes per frame; the file is about 600 bytes."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = _dataset(rows, cols, RLELossless, frames)
    segment = bytes([0x81, 0x00]) * 4  # four runs of 128 zero bytes each
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    ds.PixelData = encapsulate([header + segment + segment] * frames)
    ds["PixelData"].VR = "OB"
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def _zero_stream(n_bytes: int, block: int = 1 << 20) -> bytes:
    """Raw deflate of ``n_bytes`` zeros without ever holding them: one full-flush block
    (independent of what came before) repeated, then an empty final block."""
    whole, rest = divmod(n_bytes, block)
    out = io.BytesIO()
    repeated = zlib.compressobj(9, zlib.DEFLATED, -15)
    unit = repeated.compress(bytes(block)) + repeated.flush(zlib.Z_FULL_FLUSH)
    for _ in range(whole):
        out.write(unit)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    out.write(tail.compress(bytes(rest)) + tail.flush(zlib.Z_FINISH))
    return out.getvalue()


def deflate_bomb(path: Path, rows: int = 20000, cols: int = 20000) -> Path:
    """A Deflated Explicit VR Little Endian DICOM whose 16-bit pixel data is all zeros:
    ``rows * cols * 2`` bytes once inflated (800 MB by default) from ~780 KB on disk."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _dataset(rows, cols, DeflatedExplicitVRLittleEndian)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n_pixel = rows * cols * 2
    # (7FE0,0010) OW, reserved, 32-bit length: the element header of the pixel data.
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n_pixel)
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = head.compress(body.getvalue() + element) + head.flush(zlib.Z_FULL_FLUSH)
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path = Path(path)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + stream + _zero_stream(n_pixel))
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, width: int = 60000, height: int = 60000) -> Path:
    """A PNG whose IHDR claims ``width x height`` 8-bit grayscale with one row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(width + 1), 9)
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


def nifti_bomb(path: Path, shape: tuple[int, ...] = (2000, 2000, 2000)) -> Path:
    """A single-file NIfTI-1 header claiming an int16 volume of ``shape``, and no voxels."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    path = Path(path)
    path.write_bytes(header.binaryblock + b"\0\0\0\0")
    return path


def multiframe(path: Path, rows: int, cols: int, frames: int, seed: int = 0) -> Path:
    """A native (Explicit VR Little Endian) multi-frame 16-bit DICOM with real pixel data (a
    ramp plus noise per frame), written a frame at a time, so a stack of gigabytes can be
    built in a few megabytes of memory."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _dataset(rows, cols, ExplicitVRLittleEndian, frames)
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    write_dataset(head, ds)
    n_pixel = rows * cols * 2 * frames
    head.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n_pixel + n_pixel % 2))
    rng = np.random.default_rng(seed)
    ramp = (np.arange(cols, dtype=np.uint16)[None, :] * 7
            + np.arange(rows, dtype=np.uint16)[:, None])
    path = Path(path)
    with path.open("wb") as f:
        f.write(head.getvalue())
        for k in range(frames):
            frame = ramp + rng.integers(0, 64, (rows, cols), dtype=np.uint16) + np.uint16(k)
            f.write(frame.astype("<u2").tobytes())
    return path
