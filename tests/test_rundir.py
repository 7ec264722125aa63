"""The run record: typed round trip, atomic write, a damaged record refused in one line, the
run dir classification, config differences by dotted key, checkpoint verification and pruning."""

from __future__ import annotations

import json

import pytest
import torch

from medssl.errors import MedsslError
from medssl.io import sha256_file
from medssl.lock import LOCK_NAME
from medssl.rundir import (
    ABSENT,
    CheckpointEntry,
    Intensity,
    RunRecord,
    ShardSource,
    add_checkpoint,
    checkpoint_problem,
    config_diff,
    dir_kind,
    format_changes,
    newest_intact,
    nonfinite_tensors,
    read_record,
    write_record,
)


def _record(**extra) -> RunRecord:
    return RunRecord(medssl_version="0.1.0", git_sha="abc", method="simclr", arch="resnet10t", in_chans=1,
                     input_size=32, model_kwargs={}, config={"seed": 0, "train": {"lr": 0.3, "betas": [0.9, 0.95]}},
                     intensity=Intensity(pipeline="window", mean=[0.5], std=[0.25],
                                         window={"center": float("nan"), "width": 400.0}), **extra)


def test_round_trip_is_typed_and_atomic(tmp_path):
    record = _record(data=[ShardSource("/s", "train", "d" * 64, "salt", 2, 32)])
    write_record(tmp_path, record)
    assert not list(tmp_path.glob("*.tmp"))
    back = read_record(tmp_path)
    assert isinstance(back.data[0], ShardSource) and back.data[0].samples == 32
    assert back.intensity.window == {"center": None, "width": 400.0}   # JSON has no NaN
    assert json.loads((tmp_path / "run.json").read_text())["format"] == "medssl-run/1"
    assert read_record(tmp_path / "nowhere") is None


@pytest.mark.parametrize("text, needle", [
    ('{"format": "medssl-run/1", "arch": ', "unreadable"),
    ('{"format": "other/2"}', "format is 'other/2'"),
    ('{"format": "medssl-run/1", "arch": "x"}', "damaged"),
])
def test_damaged_record_is_one_clear_line(tmp_path, text, needle):
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(MedsslError, match=needle) as info:
        read_record(tmp_path)
    assert "\n" not in str(info.value) and "run.json" in str(info.value)


def test_dir_kind(tmp_path):
    assert dir_kind(tmp_path / "absent") == "new"
    assert dir_kind(tmp_path) == "new"
    (tmp_path / LOCK_NAME).write_text("")
    assert dir_kind(tmp_path) == "new"                 # only a lock: a run that never started
    (tmp_path / "notes.txt").write_text("x")
    assert dir_kind(tmp_path) == "foreign"
    (tmp_path / "config.yaml").write_text("x")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.txt").write_text("step_00000001.pt\n")
    assert dir_kind(tmp_path) == "legacy"
    write_record(tmp_path, _record())
    assert dir_kind(tmp_path) == "run"
    assert dir_kind(tmp_path / "notes.txt") == "foreign"


def test_config_diff_names_dotted_keys_old_and_new():
    old = {"seed": 0, "train": {"lr": 0.3, "betas": [0.9, 0.95]}, "model": {"kwargs": {}}}
    new = {"seed": 0, "train": {"lr": 0.5, "betas": (0.9, 0.95), "new_key": 1}, "model": {"kwargs": {}}}
    diff = config_diff(old, new)
    assert diff == {"train.lr": (0.3, 0.5), "train.new_key": (ABSENT, 1)}   # a tuple equals its list
    assert format_changes(diff) == "train.lr=0.3 -> 0.5, train.new_key=<absent> -> 1"


def test_checkpoint_verification_and_pruning(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    record = _record()
    for step in (1, 2, 3):
        path = folder / f"step_{step:08d}.pt"
        path.write_bytes(bytes([step]) * 100)
        dropped = add_checkpoint(record, CheckpointEntry(path.name, step, sha256_file(path), 100, True), keep=2)
    assert [e.step for e in record.checkpoints] == [2, 3] and [e.step for e in dropped] == [1]
    assert checkpoint_problem(tmp_path, record.checkpoints[1]) is None
    (folder / "step_00000003.pt").write_bytes(b"\x09" * 100)
    entry, damaged = newest_intact(tmp_path, record)
    assert entry.step == 2 and damaged[0][1] == "sha256 differs from run.json"
    (folder / "step_00000002.pt").write_bytes(b"short")
    assert checkpoint_problem(tmp_path, record.checkpoints[0]) == "5 bytes, run.json says 100"
    # a re-save at an older step (after a fallback) replaces the newer entries
    add_checkpoint(record, CheckpointEntry("step_00000002.pt", 2, "0" * 64, 5, True), keep=3)
    assert [e.file for e in record.checkpoints] == ["step_00000002.pt"]


def test_nonfinite_tensors_are_named():
    tensors = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "n": torch.tensor([3]),
               "c": torch.tensor([float("nan")], dtype=torch.bfloat16)}
    assert nonfinite_tensors(tensors) == ["b", "c"]
