"""The shard sample contract's reading side: read_sample and the one window function."""

from __future__ import annotations

import json

import numpy as np
import torch

from medssl.data.sample import encode_intensity, encode_png
from medssl.sample import read_sample, resolve_window, window_to_unit


def _raw(meta: dict, image: np.ndarray, **extra) -> dict:
    return {"__key__": "p-1-abc", "__url__": "/s/val-000003.tar", "img.png": encode_png(image),
            "json": json.dumps(meta).encode(), **extra}


def test_read_sample_types_every_field():
    hu = np.arange(-1000, -1000 + 48, dtype=np.int32).reshape(6, 8)
    stored, offset, slope = encode_intensity(hu)
    meta = {"patient": "p-1", "study": "s-2", "series": None, "modality": "CT", "channels": 1,
            "intensity": {"offset": offset, "slope": slope, "unit": "HU"},
            "window": {"center": -600, "width": 1500}, "pixel_spacing": [0.7, 0.7],
            "slice_index": 3, "attributes": {"sex": "F", "age": "40-59"}}
    s = read_sample(_raw(meta, stored, cls=b"2"))
    assert s.key == "p-1-abc" and s.split == "val" and s.label == 2 and s.channels == 1
    assert s.window == (-600.0, 1500.0) and s.unit == "HU" and s.pixel_spacing == (0.7, 0.7)
    assert s.attributes == {"sex": "F", "age": "40-59"} and s.patient == "p-1"
    np.testing.assert_array_equal(s.modality_units()[0], hu.astype(np.float32))
    # A json label wins over cls; no window stays None.
    s2 = read_sample(_raw({"label": [0, 1], "intensity": {"offset": 0, "slope": 1}}, stored))
    assert s2.label == [0, 1] and s2.window is None and s2.attributes == {}


def test_window_to_unit_maps_the_window_and_fills_missing_ones_with_min_max():
    values = torch.tensor([[[[-1000.0, 40.0, 240.0, 1000.0]]], [[[0.0, 5.0, 10.0, 20.0]]]])
    out = window_to_unit(values, torch.tensor([40.0, float("nan")]), torch.tensor([400.0, float("nan")]))
    # window 40 +- 200: -1000 clips to 0, 40 is the middle, 240 the top
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(out[1, 0, 0].numpy(), [0.0, 0.25, 0.5, 1.0])   # its own min..max
    c, w = resolve_window(values, torch.tensor([40.0, 1.0]), torch.tensor([400.0, 0.0]))
    assert c.tolist() == [40.0, 10.0] and w.tolist() == [400.0, 20.0]        # width 0: no window


def test_pretraining_and_evaluation_see_the_same_pixels():
    # The two stages' input paths share the window function: without augmentation, the
    # pretraining loader + augment and finetune's preprocessor give identical [0, 1] images.
    from finetune.inits import InitSource
    from finetune.preprocess import Preprocessor
    from finetune.tasks import Split
    from medssl.init import Init
    from pretrain.augment import window_to_unit as pretrain_window

    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, size=(16, 16))
    stored, offset, slope = encode_intensity(hu)
    split = Split(images=[stored[None]], labels=np.zeros((1, 1), dtype=np.int64),
                  intensity=[(offset, slope)], windows=[(40.0, 400.0)])
    src = InitSource(Init("random"), "random", 1, (0.0,), (1.0,), None, make=lambda: None)
    ours = Preprocessor(src, 16, "nearest")(split, np.array([0]))
    theirs = pretrain_window(torch.from_numpy(stored.astype(np.int32))[None, None],
                             torch.tensor([offset]), torch.tensor([slope]), torch.tensor([40.0]),
                             torch.tensor([400.0]))
    torch.testing.assert_close(ours, theirs)
