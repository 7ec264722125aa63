"""Readers against the reference decoders: pydicom's test files, nibabel's volumes, PIL images."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut

from medssl.data.readers import Quarantine, discover, read_slices
from medssl.errors import MedsslError

warnings.filterwarnings("ignore", module="pydicom")


def _ref(name: str) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(get_testdata_file(name))


def _one(path, **kw):
    slices = list(read_slices(Path(path), **kw))
    assert len(slices) == 1
    return slices[0]


def _edited(tmp_path: Path, name: str, out: str = "edited.dcm", **attrs) -> Path:
    ds = _ref(name)
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    path = tmp_path / out
    ds.save_as(path)
    return path


# ---------------------------------------------------------------- DICOM


def test_ct_small_equals_pydicom_modality_lut():
    ds = _ref("CT_small.dcm")
    s = _one(get_testdata_file("CT_small.dcm"))
    expected = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(s.pixels, expected)
    assert s.pixels.dtype.kind == "i"  # integral slope/intercept keep integers (lossless)
    assert s.unit == "HU" and s.modality == "CT"
    assert s.pixel_spacing == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
    assert s.patient_id == ds.PatientID and s.study_id == ds.StudyInstanceUID
    assert s.series_id == ds.SeriesInstanceUID and s.slice_index == int(ds.InstanceNumber)


@pytest.mark.parametrize("variant", [
    "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm",
])
def test_lossless_transfer_syntaxes_equal_uncompressed(variant):
    reference = _one(get_testdata_file("MR_small.dcm")).pixels
    s = _one(get_testdata_file(variant))
    assert s.pixels.dtype.isnative
    np.testing.assert_array_equal(s.pixels, reference)
    assert s.window == (600.0, 1600.0)


def test_jpeg2000_lossy_ct_in_hu():
    ds = _ref("693_J2KI.dcm")
    s = _one(get_testdata_file("693_J2KI.dcm"))
    np.testing.assert_array_equal(s.pixels, apply_modality_lut(ds.pixel_array, ds))
    assert s.pixels.min() < -1000 < s.pixels.max()  # air present, in HU


def test_monochrome1_inverted_in_modality_units(tmp_path):
    path = _edited(tmp_path, "CT_small.dcm", PhotometricInterpretation="MONOCHROME1",
                   WindowCenter=40, WindowWidth=400)
    normal = _one(get_testdata_file("CT_small.dcm")).pixels.astype(np.int64)
    s = _one(path)
    # signed 16-bit stored range mapped by intercept -1024: lo + hi = -32768 + 32767 - 2048
    np.testing.assert_array_equal(s.pixels, -2049 - normal)
    assert s.window == (-2049 - 40, 400)


def test_bits_stored_and_signedness_respected(tmp_path):
    ds = _ref("MR_small.dcm")
    arr = ds.pixel_array.astype(np.int32)
    # 12-bit signed values with junk in the 4 unused high bits of each 16-bit word
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = (((arr & 0x0FFF) | 0xA000).astype(np.uint16)).tobytes()
    ds.save_as(tmp_path / "mr12.dcm")
    expected = ((arr & 0x0FFF) ^ 0x800) - 0x800  # sign-extended 12-bit
    np.testing.assert_array_equal(_one(tmp_path / "mr12.dcm").pixels, expected)
    # unsigned 8-bit with a fractional rescale -> float32 in modality units
    ds = _ref("MR_small.dcm")
    small = (arr[:8, :8] % 256).astype(np.uint8)
    ds.set_pixel_data(small, "MONOCHROME2", 8)
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-10"
    ds.save_as(tmp_path / "u8.dcm")
    s = _one(tmp_path / "u8.dcm")
    assert s.pixels.dtype == np.float32
    np.testing.assert_allclose(s.pixels, small * 0.5 - 10)


def test_enhanced_multiframe_functional_groups(tmp_path):
    from pydicom.dataset import Dataset

    ds = _ref("MR_small.dcm")
    frames = np.stack([ds.pixel_array[:16, :16] + 100 * i for i in range(3)]).astype(np.int16)
    ds.set_pixel_data(frames, "MONOCHROME2", 16)
    for key in ("PixelSpacing", "WindowCenter", "WindowWidth", "InstanceNumber"):
        if key in ds:
            delattr(ds, key)
    shared = Dataset()
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.7, 0.8]
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -100
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for i in range(3):
        item = Dataset()
        item.FrameVOILUTSequence = [Dataset()]
        item.FrameVOILUTSequence[0].WindowCenter = 50 + i
        item.FrameVOILUTSequence[0].WindowWidth = 300
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.save_as(tmp_path / "enhanced.dcm")
    slices = list(read_slices(tmp_path / "enhanced.dcm"))
    assert [s.slice_index for s in slices] == [0, 1, 2]
    for i, s in enumerate(slices):
        np.testing.assert_array_equal(s.pixels, frames[i].astype(np.int64) * 2 - 100)
        assert s.pixel_spacing == pytest.approx((0.7, 0.8)) and s.window == (50 + i, 300)


def test_multiframe_yields_each_frame_lazily():
    ds = _ref("examples_ybr_color.dcm")
    reference = ds.pixel_array  # pydicom converts YBR_FULL_422 -> RGB by default
    frames = read_slices(Path(get_testdata_file("examples_ybr_color.dcm")), allow_burned_in=True)
    first = next(frames)  # a generator: frame 0 is available before the rest are decoded
    rest = list(frames)
    assert len(rest) + 1 == int(ds.NumberOfFrames) == 30
    for i, s in enumerate([first, *rest]):
        assert s.pixels.dtype == np.uint8 and s.pixels.shape == (240, 320, 3)
        assert s.slice_index == i
        np.testing.assert_array_equal(s.pixels, reference[i])


def test_ybr_jpeg_converted_to_rgb():
    lossless_rgb = _ref("SC_rgb_rle.dcm").pixel_array
    s = _one(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"), allow_burned_in=True)
    assert s.pixels.shape == (100, 100, 3) and s.pixels.dtype == np.uint8
    # lossy JPEG of the same picture: close to the RGB original, far from raw YCbCr
    assert np.abs(s.pixels.astype(int) - lossless_rgb).mean() < 2
    np.testing.assert_array_equal(s.pixels, _ref("SC_rgb_jpeg_dcmtk.dcm").pixel_array)


@pytest.mark.parametrize("name", ["SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm"])
def test_deep_rgb_scaled_to_uint8(name):
    eight_bit = _ref("SC_rgb_rle.dcm").pixel_array
    s = _one(get_testdata_file(name), allow_burned_in=True)
    assert s.pixels.dtype == np.uint8
    np.testing.assert_array_equal(s.pixels, eight_bit)


def test_palette_color_expanded():
    ds = _ref("examples_palette.dcm")
    expected = apply_color_lut(ds.pixel_array, ds)
    s = _one(get_testdata_file("examples_palette.dcm"), allow_burned_in=True)
    assert s.pixels.shape == (*ds.pixel_array.shape, 3) and s.pixels.dtype == np.uint8
    # 16-bit palette entries scaled to 8 bits
    np.testing.assert_array_equal(s.pixels, np.rint(expected[..., :3] / 257.0).astype(np.uint8))


def test_truncated_dicom_quarantined(tmp_path):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "half.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Quarantine) as info:
        list(read_slices(path))
    assert info.value.reason == "truncated"


@pytest.mark.parametrize("cut", [140, 200, 300, 451, 1000, 3000, 6301])
def test_dicom_cut_inside_its_header_is_truncated(tmp_path, cut):
    # pydicom reads a cut header without complaint (short values, a partial tag ends the
    # data set): inside the File Meta (140, 200, 300), inside an element's value, and
    # inside the pixel data element's header (6301) must all say "truncated".
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:cut])
    with pytest.raises(Quarantine) as info:
        list(read_slices(path))
    assert info.value.reason == "truncated"


def test_burned_in_annotation_quarantined_unless_allowed(tmp_path):
    path = _edited(tmp_path, "CT_small.dcm", BurnedInAnnotation="YES")
    with pytest.raises(Quarantine) as info:
        list(read_slices(path))
    assert info.value.reason == "burned_in_annotation"
    assert len(list(read_slices(path, allow_burned_in=True))) == 1


def test_secondary_capture_and_ultrasound_quarantined():
    with pytest.raises(Quarantine) as info:
        list(read_slices(Path(get_testdata_file("SC_rgb_rle.dcm"))))
    assert info.value.reason == "secondary_capture"
    with pytest.raises(Quarantine) as info:
        list(read_slices(Path(get_testdata_file("examples_rgb_color.dcm"))))
    assert info.value.reason == "ultrasound_burned_in"


def test_ultrasound_marked_clean_is_read(tmp_path):
    path = _edited(tmp_path, "examples_rgb_color.dcm", BurnedInAnnotation="NO")
    assert _one(path).pixels.shape == (240, 320, 3)


def test_no_pixel_data_and_non_images_quarantined(tmp_path):
    path = _edited(tmp_path, "CT_small.dcm", PixelData=None)
    with pytest.raises(Quarantine) as info:
        list(read_slices(path))
    assert info.value.reason == "no_pixel_data"
    with pytest.raises(Quarantine) as info:
        list(read_slices(Path(get_testdata_file("liver_1frame.dcm"))))
    assert info.value.reason == "not_an_image"


def test_undecodable_pixel_data_quarantined():
    with pytest.raises(Quarantine) as info:
        list(read_slices(Path(get_testdata_file("JPEG-lossy.dcm")), allow_burned_in=True))
    assert info.value.reason == "undecodable"


def test_extensionless_dicom_read_by_preamble(tmp_path):
    path = tmp_path / "IM0001"
    path.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    assert _one(path).modality == "CT"


# ---------------------------------------------------------------- discovery and dispatch


def test_discover_walks_sorted_skips_sidecars_and_outputs(tmp_path):
    root = tmp_path / "in"
    (root / "b").mkdir(parents=True)
    (root / "a" / ".git").mkdir(parents=True)
    (root / "shards").mkdir()
    for rel in ["b/img.png", "a/IM1", "a/scan.nii.gz", "a/notes.xyz", "a/labels.csv",
                "a/meta.json", ".hidden.dcm", "a/.git/x.dcm", "DICOMDIR", "b/run.salt"]:
        (root / rel).write_bytes(b"x")
    (root / "shards" / "index.json").write_text('{"format": "medssl-shards/1"}')
    (root / "shards" / "train-000000.tar").write_bytes(b"x")
    (root / "unfinished").mkdir()  # a shard run in progress: journal, no index yet
    (root / "unfinished" / ".progress.jsonl").write_text("{}")
    (root / "unfinished" / "train-000000.tar.tmp").write_bytes(b"x")
    explicit = tmp_path / "given.csv"
    explicit.write_text("a,b")
    found = discover([root, explicit, root / "b" / "img.png"])
    assert all(f.problem is None for f in found)
    rel = [f.path.relative_to(tmp_path).as_posix() for f in found]
    assert rel == ["given.csv", "in/a/IM1", "in/a/notes.xyz", "in/a/scan.nii.gz", "in/b/img.png"]
    assert discover([root]) == discover([root])
    with pytest.raises(MedsslError):
        discover([tmp_path / "missing"])


def test_discover_reports_symlink_loops_and_dangling_links(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "good.dcm").write_bytes(b"x")
    (root / "a.dcm").symlink_to(root / "b.dcm")
    (root / "b.dcm").symlink_to(root / "a.dcm")  # a.dcm -> b.dcm -> a.dcm
    (root / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    found = {f.path.name: f.problem for f in discover([root])}
    assert found == {"a.dcm": "unreadable", "b.dcm": "unreadable", "gone.dcm": "unreadable",
                     "good.dcm": None}
    assert [f.problem for f in discover([root / "a.dcm"])] == ["unreadable"]  # given directly
    with pytest.raises(Quarantine) as info:
        list(read_slices(root / "a.dcm"))
    assert info.value.reason == "unreadable"


def test_discover_follows_symlinked_folders_once(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "IM1.dcm").write_bytes(b"x")
    root = tmp_path / "in"
    (root / "real").mkdir(parents=True)
    (root / "real" / "IM2.dcm").write_bytes(b"x")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "real" / "up").symlink_to(root, target_is_directory=True)  # a loop to the root
    (root / "again").symlink_to(root / "real", target_is_directory=True)  # a second way in
    rel = [f.path.relative_to(root).as_posix() for f in discover([root])]
    assert rel == ["again/IM2.dcm", "linked/IM1.dcm"]


def test_discover_reports_a_folder_it_cannot_list(tmp_path, monkeypatch):
    import os

    root = tmp_path / "in"
    (root / "locked" / "deep").mkdir(parents=True)
    (root / "locked" / "deep" / "IM1.dcm").write_bytes(b"x")
    (root / "open.dcm").write_bytes(b"x")
    locked = str(root / "locked")
    real_scandir, real_stat = os.scandir, os.stat

    # Tests run as root, where chmod 000 does not stop anything: deny like the kernel would.
    def denied(path):
        if str(path).startswith(locked + os.sep) or str(path) == locked and deny_dir[0]:
            raise PermissionError(13, "Permission denied", str(path))

    deny_dir = [True]
    monkeypatch.setattr(os, "scandir", lambda p=".": (denied(p), real_scandir(p))[1])
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: (denied(p), real_stat(p, *a, **k))[1])
    found = {f.path.relative_to(root).as_posix(): f.problem for f in discover([root])}
    assert found == {"locked": "unreadable", "open.dcm": None}


def test_discover_keeps_a_name_that_is_not_utf8(tmp_path):
    import os

    name = os.fsdecode(b"scan_\xff\xfe.dcm")  # Latin-1 bytes from an old archive
    (tmp_path / name).write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (found,) = discover([tmp_path])
    assert found.problem is None and found.path.name == name
    assert _one(found.path).modality == "CT"


def test_quarantine_pickles_with_reason():
    import pickle

    q = pickle.loads(pickle.dumps(Quarantine("truncated", "pixel data has 1 of 2 bytes")))
    assert (q.reason, q.message) == ("truncated", "pixel data has 1 of 2 bytes")


def test_unknown_format_and_garbage_png_quarantined(tmp_path):
    unknown = tmp_path / "notes.xyz"
    unknown.write_bytes(b"hello")
    with pytest.raises(Quarantine) as info:
        list(read_slices(unknown))
    assert info.value.reason == "unsupported_format"
    garbage = tmp_path / "bad.png"
    garbage.write_bytes(np.random.default_rng(1).bytes(2048))
    with pytest.raises(Quarantine) as info:
        list(read_slices(garbage))
    assert info.value.reason == "unreadable"
    for name, data in (("rand.dcm", np.random.default_rng(0).bytes(4096)), ("empty.dcm", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(Quarantine) as info:
            list(read_slices(tmp_path / name))
        assert info.value.reason == "unreadable"
    cut = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:300])
    with pytest.raises(Quarantine) as info:
        list(read_slices(cut))
    assert info.value.reason in ("truncated", "unreadable")


# ---------------------------------------------------------------- resize


def test_resize_respects_max_side_and_scales_spacing():
    full = _one(get_testdata_file("CT_small.dcm"))
    small = _one(get_testdata_file("CT_small.dcm"), max_side=48)
    assert small.pixels.shape == (48, 48) and small.pixels.dtype == full.pixels.dtype
    assert small.pixel_spacing == pytest.approx(tuple(v * 128 / 48 for v in full.pixel_spacing))
    # reference: an independent antialiased bilinear (torch, a port of PIL's filter)
    import torch

    x = torch.from_numpy(full.pixels.astype(np.float32))[None, None]
    ref = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", antialias=True)
    assert np.abs(small.pixels - ref[0, 0].numpy()).max() <= 1.0
    assert full.pixels.min() <= small.pixels.min() and small.pixels.max() <= full.pixels.max()


def test_resize_keeps_aspect_and_rgb(tmp_path):
    path = tmp_path / "p1" / "wide.png"
    path.parent.mkdir()
    Image.fromarray(np.full((50, 100, 3), 200, np.uint8)).save(path)
    s = _one(path, max_side=40)
    assert s.pixels.shape == (20, 40, 3) and s.pixels.dtype == np.uint8
    assert (s.pixels == 200).all()
    assert _one(path, max_side=100).pixels.shape == (50, 100, 3)  # not enlarged


# ---------------------------------------------------------------- NIfTI


def _display(plane: np.ndarray) -> np.ndarray:
    return plane[::-1, ::-1].T


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_nifti_slice_counts_per_axis(name):
    from nibabel.testing import data_path

    path = Path(data_path) / name
    canonical = nib.as_closest_canonical(nib.load(path))
    data = canonical.get_fdata(dtype=np.float32)
    n_vol = data.shape[3] if data.ndim == 4 else 1
    for axis, k in (("sagittal", 0), ("coronal", 1), ("axial", 2)):
        slices = list(read_slices(path, axis=axis))
        assert len(slices) == n_vol * data.shape[k]
    axial = list(read_slices(path, axis="axial"))
    vol0 = data[..., 0] if data.ndim == 4 else data
    np.testing.assert_allclose(axial[3].pixels, _display(vol0[:, :, 3]), rtol=1e-6)
    zooms = canonical.header.get_zooms()
    assert axial[0].pixel_spacing == pytest.approx((zooms[1], zooms[0]), rel=1e-3)
    assert axial[0].patient_id == name.split(".")[0]


def test_nifti_orientation_independent_of_affine(tmp_path):
    rng = np.random.default_rng(0)
    ras = rng.normal(size=(6, 7, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(ras, np.diag([1.0, 2.0, 3.0, 1.0])), tmp_path / "ras.nii.gz")
    # Same voxels stored LPI, with axes permuted (z, x, y): a typical non-RAS acquisition
    lpi = ras[::-1, ::-1, ::-1].transpose(2, 0, 1)
    affine = np.zeros((4, 4))
    affine[0, 1], affine[1, 2], affine[2, 0], affine[3, 3] = -1.0, -2.0, -3.0, 1.0
    affine[:3, 3] = [5.0, 12.0, 12.0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(lpi), affine), tmp_path / "lpi.nii.gz")
    for axis in ("axial", "coronal", "sagittal"):
        a = list(read_slices(tmp_path / "ras.nii.gz", axis=axis))
        b = list(read_slices(tmp_path / "lpi.nii.gz", axis=axis))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.pixels, y.pixels)
            assert x.pixel_spacing == pytest.approx(y.pixel_spacing)
    axial = list(read_slices(tmp_path / "ras.nii.gz", axis="axial"))
    assert axial[0].pixels.shape == (7, 6) and axial[0].pixel_spacing == pytest.approx((2.0, 1.0))
    # anterior (high y) at the top row, patient's right (high x) at the left column
    np.testing.assert_array_equal(axial[2].pixels[0, 0], ras[5, 6, 2])


def test_nifti_scaling_applied(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, -10.0)
    nib.save(img, tmp_path / "scaled.nii")
    slices = list(read_slices(tmp_path / "scaled.nii", axis="axial"))
    np.testing.assert_allclose(slices[1].pixels, _display(raw[:, :, 1] * 2.0 - 10.0))


def test_nifti_patient_is_bids_subject_else_stem(tmp_path):
    vol = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    bids = tmp_path / "sub-07" / "ses-1" / "anat" / "sub-07_ses-1_T1w.nii.gz"
    bids.parent.mkdir(parents=True)
    nib.save(vol, bids)
    nib.save(vol, tmp_path / "case12.nii")
    assert {s.patient_id for s in read_slices(bids)} == {"sub-07"}
    assert {s.patient_id for s in read_slices(tmp_path / "case12.nii")} == {"case12"}


def test_broken_nifti_quarantined(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"\x1f\x8b" + np.random.default_rng(2).bytes(100))
    with pytest.raises(Quarantine):
        list(read_slices(path))


# ---------------------------------------------------------------- plain images


def test_camera_and_astronaut_match_pil():
    from skimage import data as skdata

    root = Path(skdata.__file__).parent
    camera = _one(root / "camera.png")
    assert camera.pixels.dtype == np.uint8 and camera.pixels.shape == (512, 512)
    np.testing.assert_array_equal(camera.pixels, np.asarray(Image.open(root / "camera.png")))
    assert camera.modality == "OT" and camera.patient_id == "data"
    astronaut = _one(root / "astronaut.png")
    assert astronaut.pixels.shape == (512, 512, 3) and astronaut.channels == 3
    np.testing.assert_array_equal(astronaut.pixels, np.asarray(Image.open(root / "astronaut.png")))
    pages = list(read_slices(root / "multipage.tif"))
    assert len(pages) == Image.open(root / "multipage.tif").n_frames == 2
    assert [p.slice_index for p in pages] == [0, 1]


def test_image_modes(tmp_path):
    rng = np.random.default_rng(1)
    sixteen = rng.integers(0, 65535, (20, 30), dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    s = _one(tmp_path / "deep.png")
    assert s.pixels.dtype == np.uint16
    np.testing.assert_array_equal(s.pixels, sixteen)

    rgba = rng.integers(0, 255, (8, 9, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(_one(tmp_path / "rgba.png").pixels, rgba[..., :3])

    gray = rng.integers(0, 255, (8, 9), dtype=np.uint8)
    Image.fromarray(gray).convert("P").save(tmp_path / "pal.png")  # gray palette
    s = _one(tmp_path / "pal.png")
    assert s.pixels.ndim == 2
    np.testing.assert_array_equal(s.pixels, gray)

    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(_one(tmp_path / "la.png").pixels, gray)
    Image.fromarray(gray > 127).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(_one(tmp_path / "bits.png").pixels, np.where(gray > 127, 255, 0))

    floats = rng.normal(size=(6, 5)).astype(np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tif")
    s = _one(tmp_path / "f.tif")
    assert s.pixels.dtype == np.float32
    np.testing.assert_array_equal(s.pixels, floats)
    ints = rng.integers(-(2**31), 2**31 - 1, (6, 5), dtype=np.int32)
    Image.fromarray(ints, mode="I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(_one(tmp_path / "i.tif").pixels, ints)
