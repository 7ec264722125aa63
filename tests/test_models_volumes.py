"""3-D starting weights (medssl/volume_models.py ``load_volume_backbone``): ``ssl:DIR`` gives back
the published tensors, ``monai-ssl:FILE`` loads MONAI's released Swin UNETR SSL layout exactly as
MONAI's own ``SwinUNETR.load_from`` does, and every wrong combination is one clear line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from medssl.errors import ConfigError, MedsslError
from medssl.init import Init
from medssl.volume_models import create_volume_backbone, load_volume_backbone

RESNET = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 16, 32]}
SWIN = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}


def write_volume_published(folder, arch="monai:ResNet", kwargs=RESNET, in_chans=1, cube=16):
    """A 3-D published dir as `medssl publish` writes it (random weights)."""
    from medssl.published import volume_config, write_sums

    folder.mkdir(parents=True)
    torch.manual_seed(3)
    backbone = create_volume_backbone(arch, in_chans, kwargs)
    save_file({k: v.contiguous() for k, v in backbone.net_state_dict().items()}, folder / "model.safetensors")
    config = volume_config(arch, backbone.net_name, backbone.net_kwargs, backbone.num_features, in_chans,
                           (cube,) * 3, [0.5] * in_chans, [0.25] * in_chans, "other", "simclr",
                           [1.5, 1.5, 2.0], {"window": {"center": 40.0, "width": 400.0}, "steps": 7})
    (folder / "config.json").write_text(json.dumps(config))
    write_sums(folder, ["config.json", "model.safetensors"])
    return folder, backbone


def write_2d_published(folder):
    """A 2-D (timm) published dir of random weights."""
    import timm

    from medssl.published import hub_config, write_sums

    folder.mkdir(parents=True)
    model = timm.create_model("test_efficientnet", num_classes=0, in_chans=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    config = hub_config(model, "test_efficientnet", 1, 32, [0.5], [0.25], "other", {}, "simclr", {})
    (folder / "config.json").write_text(json.dumps(config))
    write_sums(folder, ["config.json", "model.safetensors"])
    return folder


def write_monai_ssl_file(path, kwargs=SWIN, extra_heads=True):
    """A file in the layout of MONAI's released ``model_swinvit.pt``: ``{"state_dict": ...}`` with
    ``module.``-prefixed encoder keys, ``mlp.fc1``/``mlp.fc2`` names, plus SSL-head keys."""
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(5)
    source = SwinUNETR(in_channels=1, out_channels=1, spatial_dims=3, **kwargs)
    state = {}
    for key, value in source.swinViT.state_dict().items():
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        state["module." + key] = value.clone()
    if extra_heads:   # the released file also holds the SSL objectives' heads
        state["module.rotation_head.weight"] = torch.randn(4, 16 * kwargs["feature_size"])
        state["module.contrastive_head.weight"] = torch.randn(8, 16 * kwargs["feature_size"])
    torch.save({"state_dict": state, "epoch": 100}, path)
    return source


def test_ssl_init_loads_the_published_tensors(tmp_path):
    folder, source = write_volume_published(tmp_path / "pub")
    backbone, words = load_volume_backbone("monai:ResNet", 1, None, Init.parse(f"ssl:{folder}"))
    assert backbone.net_kwargs == source.net_kwargs
    for key, value in source.net_state_dict().items():
        assert torch.equal(backbone.net_state_dict()[key], value), key
    assert "pub" in words and "7 steps" in words and str(tmp_path) not in words
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), source.eval()(x))


def test_ssl_init_checks_sums_and_refuses_other_dims_or_nets(tmp_path):
    folder, _ = write_volume_published(tmp_path / "pub")
    with pytest.raises(ConfigError, match="weights are for monai:ResNet, not monai:DenseNet; set model.arch=monai:ResNet"):
        load_volume_backbone("monai:DenseNet", 1, None, f"ssl:{folder}")
    # 3-D weights for a 2-D (timm) benchmark: the 2-D factory's one line.
    from medssl.models import create_backbone

    with pytest.raises(MedsslError, match="weights are for 'monai:ResNet'.*set model.arch=monai:ResNet"):
        create_backbone("resnet18", 1, f"ssl:{folder}")
    # 2-D weights for a 3-D benchmark.
    flat = write_2d_published(tmp_path / "flat")
    with pytest.raises(ConfigError, match="2-D weights .*needs 3-D weights"):
        load_volume_backbone("monai:ResNet", 1, None, f"ssl:{flat}")
    (folder / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(MedsslError, match="sha256 does not match"):
        load_volume_backbone("monai:ResNet", 1, None, f"ssl:{folder}")


def test_monai_ssl_file_fills_the_encoder_like_monais_load_from(tmp_path):
    from monai.networks.nets import SwinUNETR

    path = tmp_path / "model_swinvit.pt"
    source = write_monai_ssl_file(path)
    backbone, words = load_volume_backbone("monai:SwinUNETR", 1, SWIN, Init.parse(f"monai-ssl:{path}"))
    assert "model_swinvit.pt" in words and "encoder only" in words
    ours = backbone.net.swinViT.state_dict()
    for key, value in source.swinViT.state_dict().items():
        assert torch.equal(ours[key], value), key
    qkv = "layers3.0.blocks.0.attn.qkv.weight"
    assert torch.equal(ours[qkv], source.swinViT.state_dict()[qkv])
    # Reference: MONAI's own loader reads the same file into the same tensors.
    torch.manual_seed(11)
    reference = SwinUNETR(in_channels=1, out_channels=1, spatial_dims=3, **SWIN)
    reference.load_from(torch.load(path, weights_only=True))
    for key, value in reference.swinViT.state_dict().items():
        assert torch.equal(ours[key], value), key
    # Also a file already converted as MONAI's tutorial does (swinViT. prefix, linear names).
    converted = tmp_path / "converted.pt"
    torch.save({"state_dict": {f"swinViT.{k}": v for k, v in source.swinViT.state_dict().items()}}, converted)
    again, _ = load_volume_backbone("monai:SwinUNETR", 1, SWIN, f"monai-ssl:{converted}")
    assert torch.equal(again.net.swinViT.state_dict()[qkv], ours[qkv])


def test_monai_ssl_refusals_are_one_clear_line(tmp_path):
    path = tmp_path / "model_swinvit.pt"
    write_monai_ssl_file(path)
    with pytest.raises(MedsslError, match="file not found"):
        load_volume_backbone("monai:SwinUNETR", 1, SWIN, f"monai-ssl:{tmp_path / 'absent.pt'}")
    with pytest.raises(ConfigError, match="set model.arch=monai:SwinUNETR"):
        load_volume_backbone("monai:ResNet", 1, RESNET, f"monai-ssl:{path}")
    with pytest.raises(MedsslError, match="feature_size=48"):
        load_volume_backbone("monai:SwinUNETR", 1, {**SWIN, "feature_size": 24}, f"monai-ssl:{path}")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"module.conv.weight": torch.zeros(2)}}, other)
    with pytest.raises(MedsslError, match="encoder tensors are not in the file"):
        load_volume_backbone("monai:SwinUNETR", 1, SWIN, f"monai-ssl:{other}")
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": __import__("pathlib").PurePosixPath("x")}, pickled)
    with pytest.raises(MedsslError, match="weights-only"):
        load_volume_backbone("monai:SwinUNETR", 1, SWIN, f"monai-ssl:{pickled}")
    with pytest.raises(ConfigError, match="no ImageNet weights for 3-D"):
        load_volume_backbone("monai:ResNet", 1, RESNET, "imagenet")


def test_init_parses_monai_ssl():
    init = Init.parse("monai-ssl:/w/model_swinvit.pt")
    assert init.kind == "monai-ssl" and init.is_monai_ssl and not init.is_ssl
    assert init.label == "monai-ssl:model_swinvit.pt" and Init.parse(str(init)) == init
    assert Init.parse("ssl:/w/pub").kind == "ssl"
    with pytest.raises(ConfigError, match="monai-ssl:FILE"):
        Init.parse("monai-ssl:")


def test_monai_ssl_backbone_fine_tunes_its_encoder_only(tmp_path):
    """Full fine-tuning trains the loaded Swin encoder; the never-used decoder stays frozen."""
    path = tmp_path / "model_swinvit.pt"
    write_monai_ssl_file(path)
    backbone, _ = load_volume_backbone("monai:SwinUNETR", 1, SWIN, f"monai-ssl:{path}")
    head = torch.nn.Linear(backbone.num_features, 2)
    head(backbone(torch.randn(2, 1, 32, 32, 32))).sum().backward()
    grads = {n: p.grad for n, p in backbone.net.named_parameters()}
    assert all(g is not None for n, g in grads.items() if n.startswith("swinViT.") and "cross_attn" not in n)
    assert all(g is None for n, g in grads.items() if not n.startswith("swinViT."))


@pytest.mark.parametrize("arch, kwargs, side", [
    ("monai:ResNet", RESNET, 16),
    ("monai:DenseNet", {"init_features": 8, "growth_rate": 4, "block_config": [1, 1]}, 16),
    ("monai:SwinUNETR", SWIN, 32),
    ("monai:ViT", {"img_size": 16, "patch_size": 8, "hidden_size": 24, "mlp_dim": 48,
                   "num_layers": 1, "num_heads": 2}, 16),
    ("monai:MaskedAutoEncoderViT", {"img_size": 16, "patch_size": 8, "hidden_size": 24,
                                    "mlp_dim": 48, "num_layers": 1, "num_heads": 2,
                                    "decoder_hidden_size": 12, "decoder_num_heads": 2}, 16),
])
def test_every_volume_net_gives_pooled_features_and_trains_exactly_its_feature_path(arch, kwargs, side):
    """[B, C, X, Y, Z] -> [B, num_features]; every trainable parameter gets a gradient (DDP would
    hang on one that never does), and the MONAI net's own state dict is what is published."""
    from monai.networks import nets

    backbone = create_volume_backbone(arch, 1, kwargs)
    features = backbone(torch.randn(2, 1, side, side, side))
    assert features.shape == (2, backbone.num_features)
    features.square().sum().backward()
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in backbone.parameters() if p.requires_grad)
    plain = getattr(nets, backbone.net_name)(**backbone.net_kwargs)
    plain.load_state_dict(backbone.net_state_dict())   # strict: the MONAI keys, nothing else
