"""SSL methods: SimCLR's loss against references, MAE's masking and loss, registry contract."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from medssl.config import load_config
from pretrain.config import PretrainConfig
from pretrain.resolve import resolve_method_defaults
from pretrain.methods import BACKBONE_PREFIX, available_methods, get_method

TINY_MAE = ["method.name=mae", "model.arch=vit_tiny_patch16_224", "model.kwargs={patch_size: 8, depth: 2}",
            "augment.crop_size=32", "data.load_size=32", "method.decoder_dim=32",
            "method.decoder_depth=1", "method.decoder_heads=4"]


def _cfg(*overrides: str) -> PretrainConfig:
    base = ["output_dir=x", "data.shards=y", "model.arch=resnet10t", "method.proj_hidden_dim=32",
            "method.proj_output_dim=16", "augment.crop_size=32", "data.load_size=32"]
    return resolve_method_defaults(load_config(PretrainConfig, None, base + list(overrides)))


def _nt_xent_by_hand(z0: torch.Tensor, z1: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR paper eq. 1, averaged over both views: an independent reference."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    sim = z @ z.T / t
    sim.fill_diagonal_(float("-inf"))
    n = len(z0)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)


def test_registry_lists_both_methods_with_defaults():
    assert {"simclr", "mae"} <= set(available_methods())
    assert get_method("simclr").optimizer == "lars" and get_method("simclr").n_views == 2
    assert get_method("mae").optimizer == "adamw" and get_method("mae").n_views == 1
    cfg = _cfg()
    assert cfg.train.optimizer == "lars" and cfg.augment.blur_p == 0.5 and cfg.train.lr == 0.3
    cfg = _cfg(*TINY_MAE, "train.lr=0.001", "augment.hflip_p=0.0")
    assert cfg.train.optimizer == "adamw" and cfg.train.lr == 0.001 and cfg.augment.hflip_p == 0.0
    assert cfg.augment.blur_p == 0.0 and cfg.model.kwargs["img_size"] == 32   # recorded for publish


def test_simclr_loss_matches_lightly_and_hand_reference():
    torch.manual_seed(0)
    cfg = _cfg("method.temperature=0.2")
    model = get_method("simclr").build(cfg).eval()
    x0, x1 = torch.randn(2, 6, 1, 32, 32)
    with torch.no_grad():
        loss = model([x0, x1])["loss"]
        z = model.projection_head(model.backbone(torch.cat([x0, x1])))
        z0, z1 = z.chunk(2)
        ref = NTXentLoss(temperature=0.2)(z0, z1)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(loss, _nt_xent_by_hand(z0, z1, 0.2), atol=1e-5, rtol=1e-5)


def test_simclr_backbone_is_plain_timm_with_one_channel():
    model = get_method("simclr").build(_cfg())
    sd = {k[len(BACKBONE_PREFIX):]: v for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIX)}
    ref = timm.create_model("resnet10t", num_classes=0, in_chans=1)
    ref.load_state_dict(sd, strict=True)
    assert ref.conv1[0].weight.shape[1] == 1


def test_mae_loss_masks_and_backbone_is_timm_vit():
    torch.manual_seed(0)
    model = get_method("mae").build(_cfg(*TINY_MAE, "method.mask_ratio=0.75"))
    x = torch.randn(3, 1, 32, 32)
    out = model([x])
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.backbone.patch_embed.proj.weight.grad is not None
    # 16 patches, 75% masked -> 12 targets per image; loss is MSE on normalised pixels (~1 at init)
    assert 0.3 < out["loss"].item() < 3.0
    sd = {k[len(BACKBONE_PREFIX):]: v for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIX)}
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, patch_size=8, depth=2, img_size=32)
    vit.load_state_dict(sd, strict=True)


def test_mae_loss_ignores_visible_patches():
    # Changing only pixels of kept (visible) patches must not change the regression target.
    torch.manual_seed(0)
    model = get_method("mae").build(_cfg(*TINY_MAE, "method.norm_pix_loss=false")).eval()
    x = torch.zeros(1, 1, 32, 32)
    torch.manual_seed(1)
    base = model([x])["loss"]
    torch.manual_seed(1)
    from lightly.models import utils

    keep, _ = utils.random_token_mask((1, 17), mask_ratio=0.75)
    visible = int(keep[0, 1]) - 1   # a kept patch (index 0 is the class token)
    r, c = divmod(visible, 4)
    y = x.clone()
    y[..., r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 5.0
    torch.manual_seed(1)
    changed = model([y])["loss"]
    assert not torch.equal(base, changed)   # the encoder sees it ...
    model.decoder_pred.weight.data.zero_()
    model.decoder_pred.bias.data.zero_()
    torch.manual_seed(1)
    zero_pred_x = model([x])["loss"]
    torch.manual_seed(1)
    zero_pred_y = model([y])["loss"]
    assert torch.equal(zero_pred_x, zero_pred_y)   # ... but it is not a target


def test_every_trainable_parameter_gets_a_gradient():
    # DDP (find_unused_parameters=False) fails on the second step otherwise.
    for overrides in ([], TINY_MAE):
        torch.manual_seed(0)
        cfg = _cfg(*overrides)
        model = get_method(cfg.method.name).build(cfg)
        views = [torch.randn(4, 1, 32, 32) for _ in range(get_method(cfg.method.name).n_views)]
        model(views)["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (cfg.method.name, missing)
