"""GPU augmentation on CPU tensors: shapes, ranges, per-sample randomness, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pretrain.augment import GpuAugment, crop_flip_rotate, gaussian_blur, window_to_unit
from pretrain.config import AugmentConfig
from pretrain.methods.simclr import SIMCLR_AUGMENT

SIMCLR = AugmentConfig(crop_size=24, **SIMCLR_AUGMENT)
OFF = AugmentConfig(crop_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, vflip_p=0.0,
                    rotate_degrees=0.0, window_center_jitter=0.0, window_width_jitter=0.0,
                    intensity_p=0.0, brightness=0.0, contrast=0.0, gamma=0.0, blur_p=0.0,
                    blur_sigma=(0.1, 2.0), noise_p=0.0, noise_std=0.0)


def _batch(b: int = 6, size: int = 32, same: bool = False) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, (1 if same else b, 1, size, size)).repeat(b if same else 1, axis=0)
    stored = (hu + 1024).astype(np.uint16)   # offset -1024, slope 1, like CT
    return {
        "image": torch.from_numpy(stored.view(np.int16).copy()),
        "offset": torch.full((b,), -1024.0), "slope": torch.ones(b),
        "center": torch.full((b,), 40.0), "width": torch.full((b,), 400.0),
    }


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_window_maps_modality_units_to_unit_range():
    stored = torch.tensor([[[[0, 984, 1064, 1264, 60000]]]], dtype=torch.int32)  # HU -1024, -40, 40, 240, 58976
    stored16 = torch.from_numpy(stored.numpy().astype(np.uint16).view(np.int16))
    args = (torch.tensor([-1024.0]), torch.ones(1), torch.tensor([40.0]), torch.tensor([400.0]))
    for s in (stored, stored16):  # int16-carried uint16 bits above 32767 must read back right
        x = window_to_unit(s, *args)
        torch.testing.assert_close(x.flatten(), torch.tensor([0.0, 0.3, 0.5, 1.0, 1.0]))


def test_missing_window_uses_sample_range_and_rgb_scales():
    stored = torch.tensor([[[[10, 20, 30]]], [[[0, 50, 100]]]], dtype=torch.int32)
    nan = torch.full((2,), float("nan"))
    x = window_to_unit(stored, torch.zeros(2), torch.ones(2), nan, nan)
    torch.testing.assert_close(x.flatten(1), torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]]))
    rgb = torch.tensor([[[[0, 255]]] * 3], dtype=torch.uint8)
    torch.testing.assert_close(window_to_unit(rgb, *[torch.zeros(1)] * 4).flatten(), torch.tensor([0.0, 1.0] * 3))


def test_views_shapes_ranges_and_normalisation():
    views = GpuAugment(SIMCLR, n_views=2)(_batch(), _gen())
    assert len(views) == 2
    lo, hi = (0 - SIMCLR.mean) / SIMCLR.std, (1 - SIMCLR.mean) / SIMCLR.std
    for v in views:
        assert v.shape == (6, 1, 24, 24) and v.dtype == torch.float32
        assert torch.isfinite(v).all() and v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6
        assert v.std() > 0.1   # not collapsed to a constant


def test_parameters_are_per_sample_and_per_view():
    views = GpuAugment(SIMCLR, n_views=2)(_batch(same=True), _gen())
    a, b = views
    # identical inputs: every sample of a view differs from every other (own parameters)
    flat = a.flatten(1)
    dists = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    assert dists.min() > 1e-3
    assert (a - b).flatten(1).abs().amax(dim=1).min() > 1e-3   # the two views differ per sample


def test_seeded_generator_is_deterministic():
    aug = GpuAugment(SIMCLR, n_views=2)
    v1 = aug(_batch(), _gen(7))
    v2 = aug(_batch(), _gen(7))
    v3 = aug(_batch(), _gen(8))
    for x, y in zip(v1, v2):
        assert torch.equal(x, y)
    assert not torch.equal(v1[0], v3[0])


def test_identity_geometry_and_flip():
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(crop_flip_rotate(x, 32, OFF, _gen()), x, atol=1e-5, rtol=0)
    flipped = crop_flip_rotate(x, 32, dataclasses.replace(OFF, hflip_p=1.0), _gen())
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)
    vflipped = crop_flip_rotate(x, 32, dataclasses.replace(OFF, vflip_p=1.0), _gen())
    torch.testing.assert_close(vflipped, x.flip(-2), atol=1e-5, rtol=0)


def test_crop_zooms_in():
    # A centred vertical ramp: a crop of area s shows a range of about sqrt(s) of it.
    ramp = torch.linspace(0, 1, 64).view(1, 1, 64, 1).expand(4, 1, 64, 64).contiguous()
    cfg = dataclasses.replace(OFF, scale=(0.25, 0.25))
    out = crop_flip_rotate(ramp, 32, cfg, _gen())
    spans = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert torch.allclose(spans, torch.full((4,), 0.5), atol=0.05)


def test_blur_matches_reference_and_skips_unselected():
    x = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(gaussian_blur(x, dataclasses.replace(OFF, blur_p=0.0), _gen()), x)
    cfg = dataclasses.replace(OFF, blur_p=1.0, blur_sigma=(1.5, 1.5))
    out = gaussian_blur(x, cfg, _gen())
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    ref = tv.gaussian_blur(x, kernel_size=[11, 11], sigma=[1.5, 1.5])  # reflect padding too
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_mae_defaults_only_crop_and_flip():
    from pretrain.methods.mae import MAE_AUGMENT

    cfg = AugmentConfig(crop_size=32, **MAE_AUGMENT)
    batch = _batch(size=32)
    base = window_to_unit(batch["image"], batch["offset"], batch["slope"], batch["center"], batch["width"])
    (view,) = GpuAugment(cfg, n_views=1)(batch, _gen())
    x = view * cfg.std + cfg.mean
    # only a resampling of the windowed image: values stay within its range, no noise added
    assert x.min() >= base.min() - 1e-5 and x.max() <= base.max() + 1e-5
