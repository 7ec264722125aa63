"""The training loop in-process on CPU: learning, run dir contents, checkpoint contract, NaN policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from medssl.config import load_config
from medssl.errors import ConfigError, MedsslError
from pretrain.checkpoint import latest_checkpoint
from pretrain.config import PretrainConfig
from pretrain.resolve import resolve_method_defaults
from pretrain.trainer import pretrain_command, train

DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"

TINY_MAE = ["method.name=mae", "model.arch=vit_tiny_patch16_224", "model.kwargs={patch_size: 8, depth: 2}",
            "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=4"]


def _cfg(shards: Path, out: Path, *overrides: str) -> PretrainConfig:
    return resolve_method_defaults(load_config(
        PretrainConfig, DEBUG_CONFIG, [f"data.shards={shards}", f"output_dir={out}", *overrides]))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _drop(losses: list[float], n: int = 8) -> float:
    return sum(losses[:n]) / n - sum(losses[-n:]) / n


def test_simclr_loss_decreases(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path, "train.max_steps=40", "train.checkpoint_every=100",
               "train.optimizer=adamw", "train.lr=0.02", "train.weight_decay=0", "method.temperature=0.5",
               "augment.blur_p=0", "augment.noise_p=0", "augment.scale=[0.5, 1.0]")
    assert train(cfg) == 0
    losses = [m["loss"] for m in _metrics(tmp_path)]
    assert len(losses) == 40 and _drop(losses) > 0.1, losses


def test_mae_loss_decreases(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path, *TINY_MAE, "train.max_steps=25", "train.lr=0.002",
               "train.checkpoint_every=100")
    assert cfg.train.optimizer == "adamw"
    assert train(cfg) == 0
    losses = [m["loss"] for m in _metrics(tmp_path)]
    assert _drop(losses, 5) > 0.05, losses


def test_run_dir_contract(shard_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    out = tmp_path / "run"
    code = pretrain_command(DEBUG_CONFIG, [f"data.shards={shard_dir}", f"output_dir={out}",
                                           "train.keep_checkpoints=1", "train.log_every=2"])
    assert code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["git_sha"] and saved["normalization"] == {"mean": [0.5], "std": [0.25]}
    assert saved["data_intensity"]["window"] == {"center": 40.0, "width": 400.0}
    assert saved["train"]["optimizer"] == "lars" and saved["augment"]["blur_p"] == 0.5  # resolved
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all({"step", "loss", "lr", "samples_per_s"} <= set(r) for r in rows)
    assert rows[0]["lr"] > rows[-1]["lr"] >= 0   # cosine decay
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step_00000006.pt"]

    ckpt = torch.load(latest_checkpoint(out), weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["model"]["arch"] == "resnet10t"
    prefix = ckpt["backbone_prefix"]
    backbone = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    timm.create_model("resnet10t", num_classes=0, in_chans=1).load_state_dict(backbone, strict=True)
    assert ckpt["data"]["batches"] == 6 and ckpt["scheduler"]["last_epoch"] == 6

    caplog.clear()
    with caplog.at_level("INFO"):
        assert pretrain_command(DEBUG_CONFIG, [f"data.shards={shard_dir}", f"output_dir={out}"]) == 0
    assert "already finished" in caplog.text
    with pytest.raises(ConfigError, match="model.arch='resnet10t'"):
        pretrain_command(DEBUG_CONFIG, [f"data.shards={shard_dir}", f"output_dir={out}",
                                        "train.max_steps=8", "model.arch=resnet18"])


def test_nonfinite_step_is_skipped(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path, "train.max_steps=3", "train.checkpoint_every=1",
               "train.keep_checkpoints=5", "debug.nan_at_steps=[2]")
    assert train(cfg) == 0
    rows = _metrics(tmp_path)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    ck = {s: torch.load(tmp_path / "checkpoints" / f"step_{s:08d}.pt", weights_only=True) for s in (1, 2, 3)}
    w = "backbone.conv1.0.weight"
    assert torch.equal(ck[1]["model"][w], ck[2]["model"][w])        # skipped: weights untouched
    assert not torch.equal(ck[2]["model"][w], ck[3]["model"][w])    # and training goes on
    assert all(torch.isfinite(v).all() for v in ck[3]["model"].values() if v.is_floating_point())


def test_nonfinite_streak_stops_with_step_and_checkpoint(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path, "train.max_steps=6", "train.checkpoint_every=2",
               "train.max_nonfinite_steps=2", "debug.nan_at_steps=[3, 4]")
    with pytest.raises(MedsslError) as err:
        train(cfg)
    msg = str(err.value)
    assert msg.startswith("step 4:") and "step_00000002.pt" in msg and "\n" not in msg


def test_grad_accum_consumes_micro_batches_and_checkpoints_position(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path, "train.max_steps=2", "train.grad_accum=2", "train.precision=no")
    assert cfg.train.precision == "no"   # a bare YAML `no` reads as false; still means no
    assert train(cfg) == 0
    ckpt = torch.load(latest_checkpoint(tmp_path), weights_only=True)
    assert ckpt["data"]["batches"] == 4
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["resolved"]["local_batch"] == 8


def test_too_few_shards_for_readers_is_one_clear_error(shard_dir: Path, tmp_path: Path):
    from medssl.cli import main

    code = main(["pretrain", str(DEBUG_CONFIG), f"data.shards={shard_dir}", f"output_dir={tmp_path}",
                 "data.num_workers=9"])
    assert code == 2
    with pytest.raises(MedsslError, match="8 shards for 1 ranks x 9 workers"):
        train(_cfg(shard_dir, tmp_path, "data.num_workers=9"))
