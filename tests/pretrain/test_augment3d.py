"""The 3-D device augmentation against references: identity, torch.flip, slicing, torch.rot90,
a dense 3-D Gaussian, and the generator contract (same seed, same views; per-sample draws)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.augment import window_to_unit
from pretrain.augment3d import VolumeAugment, affine_resample, gaussian_blur_3d
from pretrain.config import AugmentConfig
from pretrain.methods.simclr import SIMCLR_AUGMENT


def _params(b: int, extent=(1.0, 1.0, 1.0), centre=(0.0, 0.0, 0.0), flips=(1.0, 1.0, 1.0), angles=(0.0, 0.0, 0.0)):
    def rows(v):
        return torch.tensor([v] * b, dtype=torch.float32)
    return rows(extent), rows(centre), rows(flips), rows(angles)


def _cube(b: int = 2, c: int = 1, n: int = 16) -> torch.Tensor:
    return torch.rand(b, c, n, n, n, generator=torch.Generator().manual_seed(0))


def test_identity_affine_reproduces_the_input():
    x = _cube()
    assert torch.allclose(affine_resample(x, 16, *_params(2)), x, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_pure_flip_equals_torch_flip(axis: int):
    x = _cube()
    flips = [1.0, 1.0, 1.0]
    flips[axis] = -1.0
    assert torch.allclose(affine_resample(x, 16, *_params(2, flips=tuple(flips))), torch.flip(x, [2 + axis]), atol=1e-5)


def test_an_axis_aligned_integer_crop_equals_slicing():
    # Half-side 0.5 of a 16-voxel axis is 8 voxels; centre c starts the crop at (c + 1) * 8 - 4.
    x = _cube()
    out = affine_resample(x, 8, *_params(2, extent=(0.5, 0.5, 0.5), centre=(0.0, 0.25, -0.25)))
    assert torch.allclose(out, x[:, :, 4:12, 6:14, 2:10], atol=1e-5)


def test_a_quarter_turn_about_d_equals_rot90():
    x = _cube()
    out = affine_resample(x, 16, *_params(2, angles=(math.pi / 2, 0.0, 0.0)))
    assert torch.allclose(out, torch.rot90(x, k=-1, dims=(3, 4)), atol=1e-5)
    out = affine_resample(x, 16, *_params(2, angles=(0.0, 0.0, math.pi / 2)))   # about W: the (d, h) plane
    assert torch.allclose(out, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-5)


def test_the_3d_blur_equals_a_dense_gaussian_and_keeps_constants():
    cfg = AugmentConfig(blur_p=1.0, blur_sigma=(1.0, 1.0))
    x = _cube(n=12)
    out = gaussian_blur_3d(x, cfg, torch.Generator().manual_seed(0))
    taps = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-0.5 * taps**2)
    k = k / k.sum()
    dense = (k[:, None, None] * k[None, :, None] * k[None, None, :])[None, None]
    ref = F.conv3d(F.pad(x, (3,) * 6, mode="reflect"), dense)
    assert torch.allclose(out, ref, atol=1e-5)
    flat = torch.full((2, 1, 12, 12, 12), 0.3)
    assert torch.allclose(gaussian_blur_3d(flat, cfg, torch.Generator().manual_seed(0)), flat, atol=1e-6)


def test_window_to_unit_on_volumes_is_the_per_sample_window():
    stored = torch.randint(0, 4000, (2, 1, 4, 4, 4), dtype=torch.int32).to(torch.int16)
    offset, slope = torch.tensor([-1024.0, 0.0]), torch.tensor([1.0, 0.5])
    center, width = torch.tensor([40.0, 100.0]), torch.tensor([400.0, 800.0])
    out = window_to_unit(stored, offset, slope, center, width)
    for i in range(2):
        hu = stored[i].float() * slope[i] + offset[i]
        assert torch.allclose(out[i], ((hu - (center[i] - width[i] / 2)) / width[i]).clamp(0, 1))


def _batch(b: int = 4, n: int = 20) -> dict[str, torch.Tensor]:
    one = (torch.rand(1, 1, n, n, n, generator=torch.Generator().manual_seed(3)) * 2000).to(torch.int16)
    return {"image": one.expand(b, -1, -1, -1, -1).clone(), "offset": torch.full((b,), -1024.0),
            "slope": torch.ones(b), "center": torch.full((b,), 40.0), "width": torch.full((b,), 400.0)}


def test_views_are_deterministic_per_generator_and_differ_per_sample():
    cfg = dataclasses.replace(AugmentConfig(volume_crop_size=16), **SIMCLR_AUGMENT)
    augment = VolumeAugment(cfg, 2)
    a = augment(_batch(), torch.Generator().manual_seed(7))
    b = augment(_batch(), torch.Generator().manual_seed(7))
    c = augment(_batch(), torch.Generator().manual_seed(8))
    assert [v.shape for v in a] == [torch.Size([4, 1, 16, 16, 16])] * 2
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # One volume repeated four times: per-sample parameters make four different views.
    view = a[0]
    assert all(not torch.allclose(view[0], view[i]) for i in range(1, 4))
    assert not torch.allclose(a[0], a[1])   # the two views of a sample differ
    assert torch.isfinite(view).all()


def test_channels_last_views_are_ndhwc():
    cfg = dataclasses.replace(AugmentConfig(volume_crop_size=8), **SIMCLR_AUGMENT)
    (view,) = VolumeAugment(cfg, 1, channels_last=True)(_batch(n=10), torch.Generator().manual_seed(0))
    assert view.is_contiguous(memory_format=torch.channels_last_3d)


def test_same_patient_pairs_cut_the_second_view_from_the_partner_volume():
    cfg = AugmentConfig(volume_crop_size=10, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_axes_p=(0, 0, 0),
                        rotate_degrees=0, window_center_jitter=0, window_width_jitter=0, intensity_p=0,
                        blur_p=0, noise_p=0)
    batch = _batch(b=2, n=10)
    other = _batch(b=2, n=10)["image"] // 2
    batch.update({"partner_" + k: v for k, v in batch.items()})
    batch["partner_image"] = other
    v0, v1 = VolumeAugment(cfg, 2)(batch, torch.Generator().manual_seed(0))
    unit = window_to_unit(other, batch["offset"], batch["slope"], batch["center"], batch["width"])
    assert torch.allclose(v1, (unit - cfg.mean) / cfg.std, atol=1e-5)
    assert not torch.allclose(v0, v1)
