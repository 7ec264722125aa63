"""Label-free monitoring: RankMe and kNN on a fixed val batch, kept checkpoints, publish's choice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_shards

from medssl.config import load_config
from medssl.errors import ConfigError, MedsslError
from medssl.publish import publish_command
from medssl.rundir import CheckpointEntry, RunRecord, add_checkpoint, read_record
from pretrain.checkpoint import latest_checkpoint
from pretrain.config import PretrainConfig
from pretrain.methods import get_method
from pretrain.monitor import Monitor, knn_accuracy, rankme
from pretrain.resolve import resolve_method_defaults
from pretrain.trainer import train

DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("valshards"), n_shards=4, val_shards=2, labels=True)


def _cfg(shards: Path, out: Path, *overrides: str) -> PretrainConfig:
    return resolve_method_defaults(load_config(
        PretrainConfig, DEBUG_CONFIG, [f"data.shards={shards}", f"output_dir={out}", *overrides]))


def _numpy_rankme(x: np.ndarray) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_against_its_definition():
    rng = np.random.default_rng(0)
    full = rng.normal(size=(256, 32))
    assert rankme(torch.from_numpy(full)) == pytest.approx(_numpy_rankme(full), rel=1e-9)
    assert 28 < rankme(torch.from_numpy(full)) <= 32               # isotropic: close to d
    one = np.outer(rng.normal(size=256), rng.normal(size=32))
    assert rankme(torch.from_numpy(one)) == pytest.approx(1.0, abs=1e-3)   # rank 1
    assert rankme(torch.eye(16)) == pytest.approx(16.0, rel=1e-5)


def test_knn_on_a_planted_separable_set():
    rng = np.random.default_rng(1)
    labels = torch.tensor([0] * 40 + [1] * 40 + [2] * 40)
    centres = rng.normal(size=(3, 8)) * 10
    x = torch.from_numpy(centres[labels.numpy()] + rng.normal(size=(120, 8)))
    assert knn_accuracy(x, labels) == 1.0
    assert knn_accuracy(torch.from_numpy(rng.normal(size=(120, 8))), labels) < 0.6   # no signal


def test_evaluation_changes_no_weight_buffer_or_rng(val_shards: Path, tmp_path: Path):
    cfg = _cfg(val_shards, tmp_path, "train.eval_every=2", "train.eval_samples=24")
    monitor = Monitor.from_config(cfg)
    assert monitor.images.shape == (24, 1, 32, 32) and monitor.labels is not None
    model = get_method("simclr").build(cfg)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    row = monitor.evaluate(model.backbone, 2, torch.device("cpu"))
    assert set(row) == {"step", "kind", "rankme", "eval_samples", "knn_acc"}
    assert 1 <= row["rankme"] <= 24 and 0 <= row["knn_acc"] <= 1
    assert torch.equal(rng, torch.get_rng_state()) and model.training and model.backbone.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key          # BatchNorm statistics included
    again = Monitor.from_config(cfg).evaluate(model.backbone, 2, torch.device("cpu"))
    assert again == row                                       # the same batch, every time


def test_a_run_logs_rankme_records_it_and_publish_picks_the_best(val_shards: Path, tmp_path: Path):
    run = tmp_path / "run"
    cfg = _cfg(val_shards, run, "train.max_steps=8", "train.eval_every=2", "train.checkpoint_every=2",
               "train.keep_checkpoints=1", "train.eval_samples=32")
    assert train(cfg) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6, 8] and all(math.isfinite(r["rankme"]) for r in evals)
    record = read_record(run)
    best = max(evals, key=lambda r: (r["rankme"], r["step"]))
    kept = {e.step: e.rankme for e in record.checkpoints}
    assert 8 in kept and best["step"] in kept            # the newest, and the best despite keep=1
    assert kept[best["step"]] == best["rankme"]
    assert (run / "checkpoints" / f"step_{best['step']:08d}.pt").is_file()

    out = tmp_path / "published"
    assert publish_command(run, out, checkpoint="best-rankme") == 0
    medssl_block = json.loads((out / "config.json").read_text())["medssl"]
    assert medssl_block["checkpoint"] == {"step": best["step"], "chosen_by": "best-rankme", "rankme": best["rankme"]}
    assert medssl_block["steps"] == best["step"]
    card = (out / "README.md").read_text()
    assert f"| checkpoint | step {best['step']}: the highest RankMe on the val batch" in card
    assert publish_command(run, tmp_path / "p8", checkpoint="8") == 0
    assert json.loads((tmp_path / "p8" / "config.json").read_text())["medssl"]["checkpoint"]["chosen_by"] == "step"
    with pytest.raises(MedsslError, match=r"no checkpoint at step 3; recorded steps: "):
        publish_command(run, tmp_path / "p3", checkpoint="3")


def test_evaluating_changes_no_training_step_and_resume_keeps_the_record(val_shards: Path, tmp_path: Path):
    common = ["train.checkpoint_every=2", "train.eval_samples=16", "train.max_steps=6"]
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    assert train(_cfg(val_shards, plain, *common)) == 0
    assert train(_cfg(val_shards, watched, *common, "train.eval_every=2", "train.max_steps=4")) == 0
    first = {e.step: e.rankme for e in read_record(watched).checkpoints}
    assert set(first) == {2, 4} and all(first.values())
    # Resumed to more steps (train.max_steps may grow) ...
    assert train(_cfg(val_shards, watched, *common, "train.eval_every=2")) == 0
    after = {e.step: e.rankme for e in read_record(watched).checkpoints}
    assert after[4] == first[4] and after[6] is not None     # the record's RankMe survives resume
    # ... and an uninterrupted watched run trains exactly as an unwatched one.
    again = tmp_path / "again"
    assert train(_cfg(val_shards, again, *common, "train.eval_every=2")) == 0
    a = torch.load(latest_checkpoint(plain), weights_only=True)["model"]
    b = torch.load(latest_checkpoint(again), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_val_split_is_refused_before_any_work(shard_dir: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="train.eval_every=5 needs a val split"):
        train(_cfg(shard_dir, tmp_path / "run", "train.eval_every=5"))
    assert not (tmp_path / "run").exists()


def test_best_rankme_without_any_is_one_line(shard_dir: Path, tmp_path: Path):
    assert train(_cfg(shard_dir, tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=2")) == 0
    with pytest.raises(MedsslError, match="no checkpoint has a RankMe .*train.eval_every=0"):
        publish_command(tmp_path / "run", tmp_path / "out", checkpoint="best-rankme")


def test_rotation_keeps_the_best_rankme_checkpoint():
    record = RunRecord(medssl_version="0", git_sha="x", method="simclr", arch="resnet10t", in_chans=1,
                       input_size=32, model_kwargs={}, intensity=None, config={})  # type: ignore[arg-type]
    dropped = []
    for step, score in [(1, 3.0), (2, 9.0), (3, 4.0), (4, 5.0)]:
        dropped += add_checkpoint(record, CheckpointEntry(f"s{step}", step, "0", 1, True, rankme=score), keep=2)
    # Newest two kept, and step 2 (RankMe 9) although it is past the rotation.
    assert [e.step for e in record.checkpoints] == [2, 3, 4]
    assert [e.step for e in dropped] == [1]
