"""Label-free monitoring: RankMe and kNN on a fixed val batch, kept checkpoints, publish's choice."""

from __future__ import annotations

import json
import math
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_DINO, write_shards
from safetensors.torch import load_file

from medssl.config import load_config
from medssl.errors import ConfigError, MedsslError
from medssl.publish import publish_command
from medssl.rundir import CheckpointEntry, RunRecord, add_checkpoint, read_record
from pretrain.checkpoint import latest_checkpoint
from pretrain.config import PretrainConfig
from pretrain.methods import get_method
from pretrain.monitor import Monitor, knn_accuracy, rankme
from pretrain.resolve import resolve_method_defaults
from pretrain.trainer import pretrain_command, train

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"


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


#: Each method's published ``backbone`` at debug size (DINO's is the EMA teacher, MAE's a ViT).
METHOD_OVERRIDES = {
    "simclr": [],
    "dino": TINY_DINO,
    "mae": ["method.name=mae", "model.arch=vit_tiny_patch16_224", "model.kwargs={patch_size: 8, depth: 2}",
            "data.load_size=32", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=4"],
}


@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_evaluation_changes_no_weight_buffer_or_rng(val_shards: Path, tmp_path: Path, method: str):
    cfg = _cfg(val_shards, tmp_path, "train.eval_every=2", "train.eval_samples=24", *METHOD_OVERRIDES[method])
    monitor = Monitor.from_config(cfg)
    assert monitor.images.shape == (24, 1, 32, 32) and monitor.labels is not None
    model = get_method(method).build(cfg)
    model.train()
    if method == "dino":
        model.backbone.eval()            # a submodule in another mode than its parent stays so
    modes = {name: m.training for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    row = monitor.evaluate(model.backbone, 2, torch.device("cpu"))
    assert set(row) == {"step", "kind", "rankme", "eval_samples", "knn_acc"}
    assert 1 <= row["rankme"] <= 24 and 0 <= row["knn_acc"] <= 1
    assert torch.equal(rng, torch.get_rng_state())
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key          # BatchNorm statistics included
    again = Monitor.from_config(cfg).evaluate(model.backbone, 2, torch.device("cpu"))
    assert again == row                                       # the same batch, every time


def test_only_rank_zero_evaluates_and_every_rank_waits(val_shards: Path, tmp_path: Path):
    cfg = _cfg(val_shards, tmp_path, "train.eval_every=2", "train.eval_samples=8", "train.max_steps=5")
    backbone = get_method("simclr").build(cfg).backbone
    waits, rows, logged = [], [], []
    metrics, run = SimpleNamespace(write=rows.append), SimpleNamespace(log=logged.append)

    def accelerator(main: bool) -> SimpleNamespace:
        return SimpleNamespace(is_main_process=main, device=torch.device("cpu"),
                               wait_for_everyone=lambda: waits.append(main))

    other = Monitor.from_config(cfg, keep_images=False)
    assert other.images.numel() == 0 and [s for s in range(1, 6) if other.due(s)] == [2, 4, 5]
    assert other.log(backbone, 2, accelerator(False), None, None) is None
    value = Monitor.from_config(cfg).log(backbone, 2, accelerator(True), metrics, run)
    assert waits == [False, True] and value == rows[0]["rankme"]
    assert rows[0]["kind"] == "eval" and logged == [{k: v for k, v in rows[0].items() if k != "kind"}]


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


def test_the_monitor_may_be_turned_on_at_resume_but_its_batch_not_changed(val_shards: Path, tmp_path: Path):
    run = tmp_path / "run"
    common = ["train.checkpoint_every=2", "train.eval_samples=16"]
    assert train(_cfg(val_shards, run, *common, "train.max_steps=2")) == 0
    assert train(_cfg(val_shards, run, *common, "train.max_steps=4", "train.eval_every=2")) == 0
    assert [(e.step, e.rankme is not None) for e in read_record(run).checkpoints] == [(2, False), (4, True)]
    with pytest.raises(ConfigError, match=r"train.eval_samples=16 -> 32"):   # RankMe would not compare
        train(_cfg(val_shards, run, *common[:1], "train.max_steps=6", "train.eval_every=2",
                   "train.eval_samples=32"))


def test_no_val_split_is_refused_before_any_work(shard_dir: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="train.eval_every=5 needs a val split"):
        train(_cfg(shard_dir, tmp_path / "run", "train.eval_every=5"))
    assert not (tmp_path / "run").exists()


def test_an_unusable_val_split_is_refused(tmp_path: Path):
    rgb = write_shards(tmp_path / "rgb", n_shards=2, per_shard=4, val_shards=1, rgb=True)
    with pytest.raises(ConfigError, match=r"have \[3\] channels but model.in_chans=1"):
        Monitor.from_config(_cfg(rgb, tmp_path / "a", "train.eval_every=2"))
    one = write_shards(tmp_path / "one", n_shards=2, per_shard=1, val_shards=1)
    with pytest.raises(ConfigError, match="fewer than 2 readable val samples"):
        Monitor.from_config(_cfg(one, tmp_path / "b", "train.eval_every=2"))


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


def _rows(run: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl as (training rows, eval rows)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") != "eval"], [r for r in rows if r.get("kind") == "eval"]


def _last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # a line being written
        return 0


@pytest.mark.slow
def test_signal_then_resume_with_the_monitor_on_is_bitwise_equal(val_shards: Path, tmp_path: Path, cli_env: dict):
    """As tests/pretrain/test_resume.py, with evaluations every 3 steps (between checkpoints
    every 4): the weights, the optimizer, every RankMe and the record's per-checkpoint RankMe
    of the resumed run equal the uninterrupted run's."""
    steps = 10
    stop_after = random.Random().randint(1, steps - 2)
    sig = random.Random().choice([signal.SIGTERM, signal.SIGUSR1])
    why = f"stop after step {stop_after} with {sig.name}"

    def overrides(out: Path) -> list[str]:
        return [f"data.shards={val_shards}", f"output_dir={out}", f"train.max_steps={steps}",
                "train.checkpoint_every=4", "train.batch_size=8", "train.eval_every=3", "train.eval_samples=32"]

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert pretrain_command(DEBUG_CONFIG, overrides(ref)) == 0
    cmd = [sys.executable, "-m", "pretrain", str(DEBUG_CONFIG), *overrides(run)]
    proc = subprocess.Popen([*cmd, "debug.step_sleep=0.25"], env=cli_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while _last_step(run) < stop_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, f"{why}: exit {proc.returncode}\n{err[-3000:]}"
    again = subprocess.run(cmd, env=cli_env, cwd=REPO, capture_output=True, text=True, check=False)
    assert again.returncode == 0, f"{why}\n{again.stderr[-3000:]}"

    a = torch.load(latest_checkpoint(ref), weights_only=True)
    b = torch.load(latest_checkpoint(run), weights_only=True)
    assert a["step"] == b["step"] == steps
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{why}: {key} differs"
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][pid][name])), why
    (_, eval_a), (train_b, eval_b) = _rows(ref), _rows(run)
    assert [r["step"] for r in train_b] == list(range(1, steps + 1)), why   # no duplicates after resume
    assert [r["step"] for r in eval_b] == [3, 6, 9, 10], why
    assert [(r["rankme"], r["knn_acc"]) for r in eval_a] == [(r["rankme"], r["knn_acc"]) for r in eval_b], why
    # Each checkpoint carries the latest RankMe at or before its step, also the stop's.
    by_step = {r["step"]: r["rankme"] for r in eval_b}
    for entry in read_record(run).checkpoints:
        earlier = [s for s in by_step if s <= entry.step]
        assert entry.rankme == (by_step[max(earlier)] if earlier else None), (why, entry)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_rank_zero_evaluates_and_a_missing_val_split_stops_both(
        val_shards: Path, shard_dir: Path, tmp_path: Path, cli_env: dict):
    def launch(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
             "-m", "pretrain", str(DEBUG_CONFIG), f"data.shards={shards}", f"output_dir={out}",
             "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=2", "train.eval_samples=16",
             *extra], env=cli_env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)

    out = tmp_path / "run"
    done = launch(val_shards, out, "debug.dump_rank_weights=true")
    assert done.returncode == 0, done.stderr[-4000:]
    train_rows, eval_rows = _rows(out)
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and [r["step"] for r in eval_rows] == [2, 4]
    w0, w1 = (load_file(out / "debug" / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)           # the evaluation kept the ranks in step
    assert [e.rankme for e in read_record(out).checkpoints] == [r["rankme"] for r in eval_rows]

    # Without a val split every rank refuses at start-up, each in its own line: rank one does
    # not sit in the plan's broadcast until a launcher notices rank zero has gone.
    refused = launch(shard_dir, tmp_path / "refused")
    assert refused.returncode != 0 and refused.stderr.count("needs a val split") == 2, refused.stderr[-3000:]
    assert not (tmp_path / "refused").exists()
