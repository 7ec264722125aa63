"""wandb: offline runs are written locally, a resumed run continues the same run id."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import latest_checkpoint
from pretrain.trainer import pretrain_command

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"


def test_online_without_key_falls_back_offline_and_resume_keeps_id(
    shard_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))          # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    args = [f"data.shards={shard_dir}", f"output_dir={out}", "logging.wandb=online", "train.max_steps=2",
            "train.checkpoint_every=1"]
    with caplog.at_level("WARNING"):
        assert pretrain_command(DEBUG, args) == 0
    assert "logging offline" in caplog.text
    first = torch.load(latest_checkpoint(out), weights_only=True)["wandb_id"]
    assert first
    runs = list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{first}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))

    assert pretrain_command(DEBUG, [*args[:-2], "train.max_steps=4", "train.checkpoint_every=1"]) == 0
    assert torch.load(latest_checkpoint(out), weights_only=True)["wandb_id"] == first
    # Same id, resumed: two offline runs, both with the first id. wandb names the dirs
    # offline-run-<start second>-<id>, adding "-1" when two runs start within one second.
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first}(-\d+)?", r.name) for r in runs)
