"""ViT explanations: the token reshape and rollout read from the model (register tokens,
non-square, non-14x14 grids, dynamic image size), with fused attention off only while hooked."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from finetune.explain import attention_rollout, grad_cam, unfused_attention, vit_of, vit_reshape
from finetune.explain.rollout import _rollout, attention_modules
from finetune.full import Classifier

H, W = 48, 80            # patch 16: a 3 x 5 grid


def tiny_vit(**kw):
    args = {"pretrained": False, "num_classes": 0, "img_size": (H, W), "in_chans": 1, "depth": 2,
                "embed_dim": 32, "num_heads": 2, "reg_tokens": 4}
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args)


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.randn(3, 1, H, W)


def test_reshape_drops_class_and_register_tokens_and_keeps_the_grid():
    vit = tiny_vit()
    assert vit.num_prefix_tokens == 5 and tuple(vit.patch_embed.grid_size) == (3, 5)
    tokens = torch.zeros(2, 5 + 15, 7)
    for r in range(3):
        for c in range(5):
            tokens[:, 5 + r * 5 + c, :] = 10 * r + c
    tokens[:, :5, :] = -1                         # prefix tokens must not reach the grid
    grid = vit_reshape(vit, (H, W))(tokens)
    assert grid.shape == (2, 7, 3, 5)
    want = torch.tensor([[10 * r + c for c in range(5)] for r in range(3)], dtype=torch.float32)
    assert torch.equal(grid[0, 3], want) and torch.equal(grid[1, 0], want)
    with pytest.raises(ValueError, match="patch tokens"):
        vit_reshape(vit, (H, W))(tokens[:, :-1])


@pytest.mark.parametrize("kw", [{}, {"class_token": False, "global_pool": "avg"},
                                {"reg_tokens": 0}])
def test_grad_cam_on_vit_classifier(kw, images):
    model = Classifier(tiny_vit(**kw), 3).eval()
    assert vit_of(model) is model.backbone
    maps = grad_cam(model, images, [0, 1, 2])
    assert maps.shape == (3, H, W)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert any(np.ptp(m) > 0 for m in maps)


@pytest.mark.parametrize("kw", [{}, {"class_token": False, "global_pool": "avg"}])
def test_rollout_shape_capture_and_fused_attention_restored(kw, images):
    vit = tiny_vit(**kw)
    for m in attention_modules(vit):
        m.fused_attn = True
    with unfused_attention(vit) as attns:
        assert all(not m.fused_attn for m in attention_modules(vit))
        vit(images)
    assert all(m.fused_attn for m in attention_modules(vit))
    n = vit.num_prefix_tokens + 15
    assert len(attns) == 2 and all(a.shape == (3, 2, n, n) for a in attns)
    assert all(torch.allclose(a.sum(-1), torch.ones(3, 2, n), atol=1e-5) for a in attns)
    maps = attention_rollout(Classifier(vit, 2), images)
    assert maps.shape == (3, H, W) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert all(m.fused_attn for m in attention_modules(vit))


def test_rollout_follows_the_attention():
    # Every token attends to patch token 7 (row 1, col 2 of a 3x5 grid, after 5 prefix tokens):
    # rollout must send the class token's flow there.
    n, prefix = 20, 5
    attn = torch.zeros(1, 2, n, n)
    attn[..., prefix + 7] = 1.0
    joint = _rollout([attn, attn], "mean", 0.0)
    patch_flow = joint[0, 0, prefix:]
    assert int(patch_flow.argmax()) == 7
    assert torch.allclose(joint.sum(-1), torch.ones(1, n))


def test_rollout_with_dynamic_image_size():
    vit = tiny_vit(dynamic_img_size=True)
    x = torch.randn(2, 1, 64, 32)                 # another size: a 4 x 2 grid
    maps = attention_rollout(vit, x)
    assert maps.shape == (2, 64, 32)
    cam = grad_cam(Classifier(vit, 2), x, [0, 1])
    assert cam.shape == (2, 64, 32)


def test_rollout_refuses_a_cnn():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    with pytest.raises(ValueError, match="needs a timm ViT"):
        attention_rollout(model, torch.randn(1, 1, 32, 32))
