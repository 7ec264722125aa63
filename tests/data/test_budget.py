"""The decode budget (--max-pixels): bombs are refused from their header, never decoded;
legitimate files, including multi-frame stacks far larger than the budget, still read."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medssl.data import budget, hostile
from medssl.data.readers import Quarantine, read_slices


@pytest.fixture
def no_decode(monkeypatch):
    """Fail loudly if any decoder touches pixel data: a bomb must be refused before."""
    import nibabel.arrayproxy
    import pydicom.filereader
    import pydicom.pixels.decoders.base
    from PIL import ImageFile

    def boom(*args, **kwargs):
        raise AssertionError("pixel data was decoded")

    class NoInflate:
        MAX_WBITS = zlib.MAX_WBITS
        decompress = staticmethod(boom)  # pydicom inflates a deflated data set with this

    monkeypatch.setattr(pydicom.pixels.decoders.base.Decoder, "iter_array", boom)
    monkeypatch.setattr(pydicom.filereader, "zlib", NoInflate)
    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    monkeypatch.setattr(nibabel.arrayproxy.ArrayProxy, "_get_unscaled", boom)


def refused(path: Path, **kw) -> Quarantine:
    with pytest.raises(Quarantine) as info:
        list(read_slices(path, **kw))
    return info.value


def test_pixel_cost_counts_samples_and_wide_values():
    assert budget.pixel_cost(100, 200) == 20000
    assert budget.pixel_cost(100, 200, 3, bits=8) == 60000      # RGB: three values a pixel
    assert budget.pixel_cost(100, 200, bits=32) == 40000        # 32-bit values count twice
    assert budget.pixel_cost(10, 10, 10, 2, bits=64) == 8000
    budget.check_pixels(100, 100, "x")                          # at the budget: allowed
    with pytest.raises(Quarantine, match="101 pixel values, more than --max-pixels 100"):
        budget.check_pixels(101, 100, "x")


def test_rle_bomb_refused_from_its_header(tmp_path, no_decode):
    path = hostile.rle_bomb(tmp_path / "rle.dcm")  # 60000 x 60000 claimed
    assert path.stat().st_size < 1000
    q = refused(path)
    assert q.reason == "too_large" and "60000x60000x1 frame" in q.message


def test_deflate_bomb_inflation_is_capped(tmp_path, no_decode):
    path = hostile.deflate_bomb(tmp_path / "dfl.dcm", 4000, 4000)  # 32 MB of zeros inflated
    assert path.stat().st_size < 64_000
    q = refused(path, max_pixels=1 << 20)
    assert q.reason == "too_large" and "inflates past" in q.message
    assert budget.inflate_cap(1 << 20) < 4 << 20


def test_deflated_file_within_the_budget_still_reads():
    path = Path(get_testdata_file("image_dfl.dcm"))  # a secondary capture, hence the flag
    (s,) = read_slices(path, allow_burned_in=True)
    np.testing.assert_array_equal(s.pixels, pydicom.dcmread(path).pixel_array)
    with pytest.raises(Quarantine) as info:  # the same file under a budget it exceeds
        list(read_slices(path, allow_burned_in=True, max_pixels=100))
    assert info.value.reason == "too_large"


def test_palette_frame_counts_its_three_lookup_values():
    path = Path(get_testdata_file("examples_palette.dcm"))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    values = ds.Rows * ds.Columns * 3  # one index becomes three 16-bit LUT values
    assert len(list(read_slices(path, allow_burned_in=True, max_pixels=values))) == 1
    assert refused(path, allow_burned_in=True, max_pixels=values - 1).reason == "too_large"


def test_cut_deflated_file_is_truncated(tmp_path):
    data = Path(get_testdata_file("image_dfl.dcm")).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    assert refused(tmp_path / "cut.dcm", allow_burned_in=True).reason == "truncated"


def test_frame_budget_counts_one_frame_not_the_stack(tmp_path):
    path = hostile.multiframe(tmp_path / "tomo.dcm", 64, 48, 12)
    slices = list(read_slices(path, max_pixels=64 * 48))  # 12x the budget in total
    assert len(slices) == 12 and slices[0].pixels.shape == (64, 48)
    assert refused(path, max_pixels=64 * 48 - 1).reason == "too_large"


def test_large_multiframe_is_decoded_frame_by_frame_from_disk(tmp_path, monkeypatch):
    import pydicom.filereader

    path = hostile.multiframe(tmp_path / "tomo.dcm", 512, 512, 6)  # 3 MB: left on disk
    expected = pydicom.dcmread(path).pixel_array

    def whole_read(*args, **kwargs):
        raise AssertionError("the whole pixel data element was loaded")

    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element", whole_read)
    got = np.stack([s.pixels for s in read_slices(path)])
    np.testing.assert_array_equal(got, expected)


def test_truncated_multiframe_on_disk_is_truncated(tmp_path):
    path = hostile.multiframe(tmp_path / "tomo.dcm", 512, 512, 6)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 512 * 512])
    assert refused(path).reason == "truncated"


def test_png_over_budget_refused_before_decode(tmp_path, no_decode):
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((40, 300), np.uint8)).save(path)  # 12,000 pixels
    q = refused(path, max_pixels=11_999)
    assert q.reason == "too_large" and "300x40" in q.message
    q = refused(hostile.png_bomb(tmp_path / "bomb.png"))  # 60000 x 60000 claimed, 138 bytes
    assert q.reason == "too_large"


def test_pillow_limit_follows_the_budget(tmp_path, monkeypatch):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(path)  # 9,000 values
    # Pillow's own bomb limit set far below: the budget decides, not Pillow's global.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    (s,) = read_slices(path, max_pixels=9000)
    assert s.pixels.shape == (50, 60, 3) and Image.MAX_IMAGE_PIXELS == 100
    assert refused(path, max_pixels=8999).reason == "too_large"  # 3 values per pixel
    assert refused(path, max_pixels=1000).reason == "too_large"  # Pillow's own error path


def test_nifti_volume_budget_from_the_header(tmp_path, no_decode):
    q = refused(hostile.nifti_bomb(tmp_path / "bomb.nii"))  # 2000^3 claimed, 352 bytes
    assert q.reason == "too_large" and "2000x2000x2000 volume" in q.message
    big_ext = nib.Nifti1Header()
    big_ext.set_data_shape((2, 2, 2))
    big_ext["vox_offset"] = 1 << 30  # "extensions" of a gigabyte before the voxels
    (tmp_path / "ext.nii").write_bytes(big_ext.binaryblock + struct.pack("<i", 1))
    assert refused(tmp_path / "ext.nii").reason == "too_large"


def test_nifti_within_budget_reads_and_float_counts_twice(tmp_path):
    vol = np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    assert len(list(read_slices(tmp_path / "v.nii.gz", max_pixels=2 * vol.size))) == 10
    assert refused(tmp_path / "v.nii.gz", max_pixels=2 * vol.size - 1).reason == "too_large"
