"""Pretrain config: shipped YAMLs load, bad values fail with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.config import load_config
from medssl.errors import ConfigError
from pretrain.config import PretrainConfig, TrainConfig, cosine_factor, scaled_lr
from pretrain.resolve import resolve_config, resolve_method_defaults

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name, method, arch", [
    ("pretrain/simclr_resnet50.yaml", "simclr", "resnet50"),
    ("pretrain/mae_vit_base.yaml", "mae", "vit_base_patch16_224"),
    ("debug.yaml", "simclr", "resnet10t"),
    ("demo.yaml", "simclr", "efficientnet_lite0"),
    ("pretrain/simclr_resnet3d.yaml", "simclr", "monai:ResNet"),
    ("pretrain/mae_vit3d.yaml", "mae", "monai:MaskedAutoEncoderViT"),
    ("debug_volumes.yaml", "simclr", "monai:ResNet"),
])
def test_shipped_configs_load(name: str, method: str, arch: str):
    cfg = resolve_method_defaults(load_config(PretrainConfig, CONFIGS / name))
    assert cfg.method.name == method and cfg.model.arch == arch and cfg.model.in_chans == 1
    assert cfg.train.lr is not None and cfg.augment.scale is not None


@pytest.mark.parametrize("override, needle", [
    ("model.in_chans=2", "model.in_chans"),
    ("augment.crop_size=64", "augment.crop_size 64 must be <= data.load_size"),
    ("method.name=byol", "method.name must be one of dino | mae | simclr"),
    ("train.grad_accum=3", "train.grad_accum"),
    ("augment.hflip_p=1.5", "augment.hflip_p"),
    ("train.optimizer=adam", "train.optimizer must be one of"),
    ("logging.wandb=yes", "logging.wandb"),
    ("train.eval_every=-1", "train.eval_every must be >= 0"),
    ("train.eval_samples=1", "train.eval_samples must be >= 2"),
])
def test_bad_values_name_the_key(override: str, needle: str):
    # The method name is checked against the registry when the config is resolved (as
    # `medssl pretrain` does right after loading), not by the dataclass: see pretrain/resolve.py.
    with pytest.raises(ConfigError, match=needle.replace("|", r"\|")):
        resolve_config(load_config(PretrainConfig, CONFIGS / "debug.yaml", [override]))


def test_lr_scales_with_global_batch_and_schedule_shape():
    cfg = TrainConfig(max_steps=100, batch_size=1024, lr=0.3, warmup_steps=10, min_lr_ratio=0.1)
    assert scaled_lr(cfg) == pytest.approx(1.2)
    assert cosine_factor(0, cfg) == pytest.approx(0.1) and cosine_factor(9, cfg) == pytest.approx(1.0)
    assert cosine_factor(10, cfg) == pytest.approx(1.0)
    assert cosine_factor(55, cfg) == pytest.approx(0.55)
    assert cosine_factor(100, cfg) == pytest.approx(0.1)
