"""wandb (offline) gets one log per finished cell and the tables; disabled never imports it."""

from __future__ import annotations

import sys

import yaml
from finetune_data import write_labeled_shards

from finetune.runner import finetune_command


def _config(tmp_path, mode):
    folder = write_labeled_shards(tmp_path / "s", kind="binary", patients=15, per_patient=2, size=16)
    cfg = {"output_dir": str(tmp_path / "bench"), "model": {"arch": "test_efficientnet"},
           "inits": ["random"], "tasks": [{"name": "t", "kind": "shards", "path": str(folder)}],
           "protocols": ["knn"], "label_fractions": [1.0], "seeds": [0, 1], "input_size": 16,
           "bootstrap": {"n": 20}, "device": "cpu", "logging": {"wandb": mode}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_wandb_offline_run_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert finetune_command(_config(tmp_path, "offline"), []) == 0
    runs = list((tmp_path / "bench" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (tmp_path / "bench" / "wandb_id.txt").read_text() in runs[0].name
    assert list(runs[0].glob("*.wandb"))


def test_disabled_does_not_import_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would now fail
    assert finetune_command(_config(tmp_path, "disabled"), []) == 0
