"""Intensity encoding: lossless for integer scans, faithful for float, PNG with no text chunks."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.sample import decode_image, encode_intensity, encode_png
from medssl.sample import ShardSample


def test_integer_ct_round_trips_exactly():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3071, size=(37, 41)).astype(np.int16)
    stored, offset, slope = encode_intensity(hu)
    assert stored.dtype == np.uint16 and slope == 1.0 and offset == hu.min()
    back = ShardSample("k", decode_image(encode_png(stored)), offset=offset, slope=slope).modality_units()
    np.testing.assert_array_equal(back[0], hu.astype(np.float32))


def test_float_volume_keeps_16_bit_precision():
    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 300.0, size=(32, 32)).astype(np.float32)
    stored, offset, slope = encode_intensity(values)
    back = stored.astype(np.float64) * slope + offset
    assert np.abs(back - values).max() <= slope / 2 + 1e-6
    assert stored.min() == 0 and stored.max() == 65535


def test_rgb_is_stored_as_8_bit_and_png_has_no_text_chunks():
    rgb = np.random.default_rng(2).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    png = encode_png(rgb)
    assert b"tEXt" not in png and b"iTXt" not in png and b"zTXt" not in png and b"eXIf" not in png
    np.testing.assert_array_equal(decode_image(png), rgb.transpose(2, 0, 1))


def test_non_finite_values_do_not_poison_the_range():
    values = np.array([[0.0, np.nan], [np.inf, 10.5]], dtype=np.float32)
    stored, offset, slope = encode_intensity(values)
    assert np.isfinite(offset) and np.isfinite(slope) and stored.max() == 65535


def test_unsupported_arrays_are_refused():
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_intensity(np.zeros((2, 2, 4, 4)))


def test_volume_member_round_trips_exactly_and_never_unpickles():
    from medssl.data.sample import decode_volume, encode_volume

    hu = np.arange(-1024, -1024 + 6 * 7 * 5).reshape(6, 7, 5).astype(np.int16)
    stored, offset, slope = encode_intensity(hu)   # volumes: the same rule as slices
    assert (offset, slope) == (-1024.0, 1.0)
    data = encode_volume(stored)
    assert data == encode_volume(stored)           # deterministic bytes (gzip mtime 0)
    back = decode_volume(data)
    assert back.shape == (1, 6, 7, 5) and back.dtype == np.uint16
    assert np.array_equal(back[0] * slope + offset, hu)
    import gzip
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):   # an object .npy is refused, never loaded
        decode_volume(gzip.compress(buf.getvalue()))
