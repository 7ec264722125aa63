"""Checkpoints are verified against run.json before they are trusted, and weights that are not
finite are never saved as good; non-finite settings are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, snapshot

from medssl.io import sha256_file
from medssl.rundir import read_record


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"output_dir={out}", *extra]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_record_lists_every_checkpoint_with_its_digest(finished_run):
    record = read_record(finished_run)
    assert [(e.file, e.step, e.weights_finite) for e in record.checkpoints] == [
        ("step_00000003.pt", 3, True), ("step_00000006.pt", 6, True)]
    for entry in record.checkpoints:
        path = finished_run / "checkpoints" / entry.file
        assert sha256_file(path) == entry.sha256 and path.stat().st_size == entry.bytes
    assert (record.method, record.arch, record.in_chans, record.input_size) == ("simclr", "resnet10t", 1, 32)
    assert record.intensity.window == {"center": 40.0, "width": 400.0} and record.intensity.mean == [0.5]
    assert record.starts[0].step == 0 and record.starts[0].world_size == 1


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(shard_dir, run_copy, capsys):
    _flip(run_copy / "checkpoints" / "step_00000006.pt")
    code, _, err = run_cli(capsys, *_args(shard_dir, run_copy, "train.max_steps=8"))
    assert code == 0, err
    warning = next(line for line in err.splitlines() if "newest intact checkpoint" in line)
    assert "step_00000006.pt (sha256 differs from run.json)" in warning
    assert "resuming from step_00000003.pt (step 3)" in warning
    assert _steps(run_copy) == list(range(1, 9))       # steps 4-6 logged again, once each
    record = read_record(run_copy)
    assert [e.step for e in record.checkpoints] == [3, 6, 8]
    assert sha256_file(run_copy / "checkpoints" / "step_00000006.pt") == record.checkpoints[1].sha256


def test_no_intact_checkpoint_is_refused_naming_each(shard_dir, run_copy, capsys):
    _flip(run_copy / "checkpoints" / "step_00000006.pt")
    (run_copy / "checkpoints" / "step_00000003.pt").unlink()
    before = snapshot(run_copy)
    code, errors, err = run_cli(capsys, *_args(shard_dir, run_copy, "train.max_steps=8"))
    assert code == 2 and len(errors) == 1, err
    assert "no intact checkpoint: step_00000006.pt (sha256 differs from run.json), " \
           "step_00000003.pt (missing)" in errors[0]
    assert snapshot(run_copy) == before


def test_nonfinite_weights_are_never_saved_and_stop_naming_the_last_good(shard_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, errors, err = run_cli(capsys, *_args(shard_dir, out, "train.checkpoint_every=2",
                                               "debug.nan_weights_at_step=3"))
    assert code == 2 and len(errors) == 1, err
    assert "step 4: model weights are not finite in" in errors[0]
    assert f"last good checkpoint: {out / 'checkpoints' / 'step_00000002.pt'}" in errors[0]
    assert (out / "checkpoints" / "latest.txt").read_text().strip() == "step_00000002.pt"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.txt", "step_00000002.pt"]
    assert [e.step for e in read_record(out).checkpoints] == [2]
    ckpt = torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("method.temperature=-.inf", "method.temperature"),
    ("augment.scale=[.nan, 1.0]", "augment.scale[0]"),
    ("model.kwargs={drop_path_rate: .nan}", "model.kwargs.drop_path_rate"),
])
def test_nonfinite_setting_is_refused_before_any_work(shard_dir, tmp_path, capsys, override, key):
    code, errors, _ = run_cli(capsys, *_args(shard_dir, tmp_path / "run", override))
    assert code == 2 and len(errors) == 1
    assert f"{key} must be a finite number" in errors[0]
    assert not (tmp_path / "run").exists()
