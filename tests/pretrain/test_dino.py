"""DINO: a distinct EMA teacher, multi-crop on the device, the collapse monitor and its stop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import TINY_DINO
from lightly.utils.scheduler import cosine_schedule

from medssl.config import load_config
from medssl.data.sample import encode_intensity, encode_png
from medssl.errors import ConfigError, MedsslError
from pretrain.augment import GpuAugment
from pretrain.checkpoint import latest_checkpoint
from pretrain.config import PretrainConfig
from pretrain.methods import get_method
from pretrain.resolve import resolve_config, resolve_method_defaults
from pretrain.trainer import train

DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"


def _cfg(shards: Path, out: Path, *overrides: str) -> PretrainConfig:
    return resolve_method_defaults(load_config(
        PretrainConfig, DEBUG_CONFIG, [f"data.shards={shards}", f"output_dir={out}", *TINY_DINO, *overrides]))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _batch(b: int = 4, size: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randint(0, 2000, (b, 1, size, size), generator=g, dtype=torch.int32),
            "offset": torch.full((b,), -1000.0), "slope": torch.ones(b),
            "center": torch.full((b,), 40.0), "width": torch.full((b,), 400.0)}


def test_debug_run_logs_the_monitors_and_checkpoints_teacher_centre_and_schedule(shard_dir: Path, tmp_path: Path):
    assert train(_cfg(shard_dir, tmp_path)) == 0
    rows = _metrics(tmp_path)
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["collapse_std"] > 0 and 0 < r["teacher_entropy"] <= math.log(128) + 1e-4 for r in rows)
    state = torch.load(latest_checkpoint(tmp_path), weights_only=True)["model"]
    assert int(state["schedule_step"]) == 6
    assert state["criterion.center"].abs().sum() > 0          # the centre moved and is saved
    assert any(k.startswith("teacher_head.") for k in state)
    # The published prefix is the teacher: it differs from the student after training.
    assert not torch.equal(state["backbone.conv1.0.weight"], state["student_backbone.conv1.0.weight"])


def test_teacher_is_a_distinct_module_moved_only_by_the_ema(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path)
    model = get_method("dino").build(cfg)
    teacher = {id(p) for p in (*model.backbone.parameters(), *model.teacher_head.parameters())}
    student = {id(p) for p in (*model.student_backbone.parameters(), *model.student_head.parameters())}
    assert model.backbone is not model.student_backbone and not teacher & student
    views = GpuAugment(cfg.augment, 2)(_batch(), torch.Generator().manual_seed(1))
    out = model(views)
    out["loss"].backward()
    for name, p in [*model.backbone.named_parameters(), *model.teacher_head.named_parameters()]:
        assert p.grad is None and not p.requires_grad, name
    assert all(p.grad is not None for p in model.student_backbone.parameters())

    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.before_optimizer_step(0)
    opt.step()
    model.after_optimizer_step(0)
    m = cosine_schedule(0, cfg.train.max_steps, cfg.method.momentum_teacher, 1.0)
    student_now = dict(model.student_backbone.named_parameters())
    for name, p in model.backbone.named_parameters():
        expected = before[name] * m + student_now[name].detach() * (1 - m)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6, msg=name)


def test_last_layer_is_frozen_for_the_configured_steps(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path, "method.freeze_last_layer_steps=2")
    model = get_method("dino").build(cfg)
    views = GpuAugment(cfg.augment, 2)(_batch(), torch.Generator().manual_seed(1))
    last = list(model.student_head.last_layer.parameters())
    for step, frozen in [(0, True), (1, True), (2, False)]:
        model.zero_grad()
        model(views)["loss"].backward()
        model.before_optimizer_step(step)
        assert all((p.grad is None) == frozen for p in last if p.requires_grad), step


def test_multi_crop_is_two_global_plus_local_views_and_deterministic(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path, "augment.local_crops=3")
    augment = GpuAugment(cfg.augment, get_method("dino").n_views)
    batch = _batch()
    views = augment(batch, torch.Generator().manual_seed(5))
    assert [tuple(v.shape) for v in views] == [(4, 1, 32, 32)] * 2 + [(4, 1, 16, 16)] * 3
    again = augment(batch, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert not torch.equal(views[2], views[3])   # each local crop draws its own window
    with pytest.raises(ConfigError, match="takes no local crops"):
        resolve_method_defaults(load_config(PretrainConfig, DEBUG_CONFIG, [
            f"data.shards={shard_dir}", f"output_dir={tmp_path}", "augment.local_crops=2",
            "augment.local_crop_size=16"]))


def test_a_fixed_size_vit_with_local_crops_is_refused_before_any_work(shard_dir: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="need model.kwargs.dynamic_img_size=true"):
        resolve_config(load_config(PretrainConfig, DEBUG_CONFIG, [
            f"data.shards={shard_dir}", f"output_dir={tmp_path / 'run'}", *TINY_DINO,
            "model.arch=vit_tiny_patch16_224", "model.kwargs={patch_size: 8, depth: 2, img_size: 32}"]))
    assert not (tmp_path / "run").exists()
    # With dynamic_img_size the same ViT takes both crop sizes.
    resolve_config(load_config(PretrainConfig, DEBUG_CONFIG, [
        f"data.shards={shard_dir}", f"output_dir={tmp_path / 'run'}", *TINY_DINO,
        "model.arch=vit_tiny_patch16_224", "model.kwargs={patch_size: 8, depth: 2, dynamic_img_size: true}"]))


def test_check_health_counts_rows_under_the_floor(shard_dir: Path, tmp_path: Path):
    model = get_method("dino").build(_cfg(shard_dir, tmp_path, "method.collapse_patience=3"))
    floor = model.collapse_std_min / math.sqrt(model.dim)
    assert model.check_health({"collapse_std": floor / 2}) is None
    assert model.check_health({"collapse_std": floor * 2}) is None     # recovered: count restarts
    assert model.check_health({"collapse_std": floor / 2}) is None
    assert model.check_health({"collapse_std": floor / 2}) is None
    message = model.check_health({"collapse_std": floor / 2})
    assert message.startswith("DINO collapsed") and "3 logged steps in a row" in message


def test_a_collapsing_run_stops_with_the_message(shard_dir: Path, tmp_path: Path):
    # A floor no real output reaches stands for collapse.
    cfg = _cfg(shard_dir, tmp_path, "method.collapse_std_min=1000", "method.collapse_patience=2")
    with pytest.raises(MedsslError, match=r"^step 2: DINO collapsed: .*; last good checkpoint: none$"):
        train(cfg)


def _bright_squares(out: Path, n: int = 128, size: int = 40, per_shard: int = 16) -> Path:
    """Dark images, each with one bright square at a random place and of a random size."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(n // per_shard):
        with wds.TarWriter(str(out / f"train-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                img = rng.normal(-900, 20, (size, size))
                side = int(rng.integers(6, 16))
                y, x = rng.integers(0, size - side, 2)
                img[y:y + side, x:x + side] = rng.uniform(200, 600)
                stored, offset, slope = encode_intensity(img.round().astype(np.int16))
                meta = {"modality": "CT", "channels": 1, "intensity": {"offset": offset, "slope": slope, "unit": "HU"},
                        "window": {"center": 40.0, "width": 1200.0}}
                sink.write({"__key__": f"s{s}-{i}", "img.png": encode_png(stored), "json": json.dumps(meta).encode()})
    return out


@pytest.mark.slow
def test_bright_square_run_does_not_collapse(tmp_path: Path):
    shards = _bright_squares(tmp_path / "shards")
    cfg = resolve_method_defaults(load_config(PretrainConfig, DEBUG_CONFIG, [
        f"data.shards={shards}/train-{{000000..000007}}.tar", f"output_dir={tmp_path / 'run'}", *TINY_DINO,
        "train.max_steps=100", "train.checkpoint_every=100", "train.log_every=10", "train.warmup_steps=5",
        "train.lr=0.002", "method.head_hidden_dim=256", "method.head_bottleneck_dim=64",
        "method.head_output_dim=256", "method.freeze_last_layer_steps=20"]))
    assert train(cfg) == 0
    rows = _metrics(tmp_path / "run")
    floor = 0.5 / math.sqrt(cfg.method.head_output_dim)
    assert len(rows) == 10 and all(r["collapse_std"] > floor for r in rows), [r["collapse_std"] for r in rows]
    # Not the uniform collapse either: the teacher's mean output stays below the maximal entropy.
    assert rows[-1]["teacher_entropy"] < math.log(cfg.method.head_output_dim) - 0.1


def test_a_compiled_dino_does_not_recompile_during_the_temperature_warm_up(shard_dir: Path, tmp_path: Path):
    cfg = _cfg(shard_dir, tmp_path, "method.warmup_teacher_temp_steps=10", "method.warmup_teacher_temp=0.02")
    model = get_method("dino").build(cfg)
    model.compile(backend="eager")
    views = GpuAugment(cfg.augment, 2)(_batch(), torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(4):   # each step a different teacher temperature
            model(views)
            model.before_optimizer_step(step)
    assert model._step == 4
