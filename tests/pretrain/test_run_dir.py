"""The run dir is this run's only: foreign folders, other runs and a second command are refused
with one line and left byte-identical; a resume continues only the same run; a torn metrics line
does not block it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, snapshot

from medssl.lock import LOCK_NAME
from medssl.rundir import read_record


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"output_dir={out}", *extra]


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- item 7: never write into a folder that is not this run's -----------------------------


def test_unrelated_folder_is_refused_and_left_byte_identical(shard_dir, tmp_path, capsys):
    out = tmp_path / "someone_elses"
    (out / "logs").mkdir(parents=True)
    (out / "config.yaml").write_text("my: settings\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (out / "logs" / "shards_rank0.json").write_text("{}\n")
    (out / "notes.txt").write_text("results I care about\n")
    before = snapshot(out)
    code, errors, err = run_cli(capsys, *_args(shard_dir, out))
    assert code == 2 and len(errors) == 1, err
    assert f"{out}: output_dir is not a medssl run dir" in errors[0] and "config.yaml" in errors[0]
    assert snapshot(out) == before and not (out / LOCK_NAME).exists()
    assert "Traceback" not in err


def test_output_dir_that_is_a_file_is_refused(shard_dir, tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("data")
    code, errors, _ = run_cli(capsys, *_args(shard_dir, out))
    assert code == 2 and "is a file" in errors[0] and out.read_text() == "data"


def test_folder_with_only_a_stale_lock_starts_a_new_run(shard_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text('{"pid": 1}\n')   # a run that died before writing run.json
    code, _, err = run_cli(capsys, *_args(shard_dir, out, "train.max_steps=2"))
    assert code == 0, err
    record = read_record(out)
    assert record is not None and [e.step for e in record.checkpoints] == [2]


def test_run_dir_from_before_run_json_is_adopted_only_when_its_config_matches(shard_dir, run_copy, capsys):
    (run_copy / "run.json").unlink()
    (run_copy / "logs" / "shard_checks.json").unlink()
    latest = run_copy / "checkpoints" / "step_00000006.pt"
    ckpt = torch.load(latest, weights_only=True)
    del ckpt["config"]["data"]["verify"]           # settings older code did not have
    del ckpt["config"]["debug"]["nan_weights_at_step"]
    torch.save(ckpt, latest)
    before = snapshot(run_copy)
    code, errors, _ = run_cli(capsys, *_args(shard_dir, run_copy, "train.max_steps=8", "seed=1"))
    assert code == 2 and len(errors) == 1
    assert "seed=0 -> 1" in errors[0] and "checkpoints" in errors[0]
    assert snapshot(run_copy) == before

    code, _, err = run_cli(capsys, *_args(shard_dir, run_copy, "train.max_steps=8"))
    assert code == 0, err
    assert "adopting it" in err
    record = read_record(run_copy)
    assert record.starts[-1].adopted and record.starts[-1].step == 6
    assert [e.step for e in record.checkpoints] == [3, 6, 8]
    assert _steps(run_copy) == list(range(1, 9))


# --- item 8: resume only the same run -------------------------------------------------------


@pytest.mark.parametrize("override, shown", [
    ("train.lr=0.5", "train.lr=0.3 -> 0.5"),
    ("train.batch_size=8", "train.batch_size=16 -> 8"),
    ("seed=7", "seed=0 -> 7"),
    ("method.temperature=0.5", "method.temperature=0.2 -> 0.5"),
    ("augment.crop_size=24", "augment.crop_size=32 -> 24"),
])
def test_a_different_setting_is_refused_naming_it(shard_dir, run_copy, capsys, override, shown):
    before = snapshot(run_copy)
    code, errors, err = run_cli(capsys, *_args(shard_dir, run_copy, "train.max_steps=8", override))
    assert code == 2 and len(errors) == 1, err
    assert "output_dir holds another run" in errors[0] and shown in errors[0], errors[0]
    assert "--force-resume" in errors[0] and "max_steps" not in errors[0]   # safe keys not named
    assert snapshot(run_copy) == before


def test_other_shards_are_refused_naming_every_difference(shard_dir, run_copy, tmp_path, capsys):
    other = tmp_path / "copy_of_shards"
    shutil.copytree(shard_dir, other)
    before = snapshot(run_copy)
    code, errors, _ = run_cli(capsys, *_args(other, run_copy, "seed=2", "train.lr=0.4"))
    assert code == 2
    assert f"data.shards='{shard_dir}' -> '{other}'" in errors[0]
    assert "seed=0 -> 2" in errors[0] and "train.lr=0.3 -> 0.4" in errors[0]
    assert snapshot(run_copy) == before


def test_changed_index_json_is_refused_then_forced_and_recorded(run_copy, tmp_path, capsys, make_shards):
    shards = make_shards(tmp_path / "shards")       # same content as the run's, another folder
    code, _, err = run_cli(capsys, *_args(shards, run_copy, "train.max_steps=7", "--force-resume"))
    assert code == 0, err                           # data.shards changed: forced
    index = json.loads((shards / "index.json").read_text())
    index["created"] = "2027"                       # same path, different index.json
    (shards / "index.json").write_text(json.dumps(index))
    before = snapshot(run_copy)
    code, errors, _ = run_cli(capsys, *_args(shards, run_copy, "train.max_steps=8"))
    assert code == 2 and "not the shards this run read before step 7" in errors[0]
    assert snapshot(run_copy) == before
    assert run_cli(capsys, *_args(shards, run_copy, "train.max_steps=8", "--force-resume"))[0] == 0
    record = read_record(run_copy)
    assert [s.from_step for s in record.data] == [0, 6, 7]
    assert [sorted(f.changed) for f in record.forced_resumes] == [["data.shards", "data.sources"],
                                                                  ["data.sources"]]


def test_safe_settings_resume_and_force_resume_is_recorded(shard_dir, run_copy, capsys):
    code, _, err = run_cli(capsys, *_args(shard_dir, run_copy, "train.max_steps=8", "train.log_every=2",
                                          "train.checkpoint_every=4", "logging.progress=true"))
    assert code == 0, err
    assert "resuming with changed settings" in err and "train.max_steps=6 -> 8" in err
    assert _steps(run_copy) == [1, 2, 3, 4, 5, 6, 8]
    # the CLI flag may follow the overrides
    code, _, err = run_cli(capsys, *_args(shard_dir, run_copy, "train.max_steps=9", "train.lr=0.5"),
                           "--force-resume")
    assert code == 0, err
    record = read_record(run_copy)
    assert record.forced_resumes[-1].step == 8
    assert record.forced_resumes[-1].changed == {"train.lr": [0.3, 0.5]}
    assert record.config["train"]["lr"] == 0.5 and record.starts[-1].step == 8


def test_model_cannot_change_even_when_forced(shard_dir, run_copy, capsys):
    before = snapshot(run_copy)
    code, errors, _ = run_cli(capsys, *_args(shard_dir, run_copy, "train.max_steps=8", "model.arch=resnet18"),
                              "--force-resume")
    assert code == 2 and "model.arch='resnet10t' -> 'resnet18'" in errors[0]
    assert "cannot change on resume" in errors[0]
    assert snapshot(run_copy) == before


def test_finished_run_with_another_config_is_refused_not_reported_done(shard_dir, run_copy, capsys):
    code, errors, _ = run_cli(capsys, *_args(shard_dir, run_copy, "seed=5"))
    assert code == 2 and "seed=0 -> 5" in errors[0]
    code, _, err = run_cli(capsys, *_args(shard_dir, run_copy, "train.log_every=3"))
    assert code == 0 and "already finished" in err


# --- item 10: one command per run dir -------------------------------------------------------


@pytest.mark.slow
def test_second_command_on_a_running_run_dir_is_refused_in_one_line(shard_dir, tmp_path, cli_env, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "pretrain", str(REPO / "configs" / "debug.yaml"),
         *_args(shard_dir, out, "train.max_steps=40", "train.checkpoint_every=2", "debug.step_sleep=0.2")],
        env=cli_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-3000:]
        code, errors, err = run_cli(capsys, *_args(shard_dir, out, "train.max_steps=40",
                                                   "train.checkpoint_every=2"))
        assert code == 2 and len(errors) == 1, err
        assert f"{out}: run dir is in use by" in errors[0] and f"pid {first.pid}" in errors[0]
    finally:
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 75, first_err[-3000:]
    steps = _steps(out)
    assert steps == list(range(1, len(steps) + 1))   # one writer: no interleaved lines
    assert not list(out.rglob("*.tmp"))


# --- item 13: a torn last line of metrics.jsonl ---------------------------------------------


def test_torn_metrics_line_does_not_block_resume(shard_dir, run_copy, capsys):
    with (run_copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 4.1')       # the crash came mid-write
    code, _, err = run_cli(capsys, *_args(shard_dir, run_copy, "train.max_steps=8"))
    assert code == 0, err
    assert "dropped 1 unreadable line" in err
    assert _steps(run_copy) == list(range(1, 9))


def test_resume_truncates_metrics_to_the_restored_checkpoint(shard_dir, run_copy, capsys):
    # The newest checkpoint (6) is gone from the record's view: resume from 3, log 4.. again.
    damaged = run_copy / "checkpoints" / "step_00000006.pt"
    os.truncate(damaged, damaged.stat().st_size - 1)
    with (run_copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')
    code, _, err = run_cli(capsys, *_args(shard_dir, run_copy))
    assert code == 0, err
    assert _steps(run_copy) == [1, 2, 3, 4, 5, 6]
