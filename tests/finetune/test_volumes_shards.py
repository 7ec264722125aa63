"""Labeled volume shards (``vol.npy.gz``) as a 3-D task: loaded with patients, windowed in
modality units, resized to each init's cube, benchmarked end to end with patient intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from volume_data import (
    TINY_RESNET,
    TINY_SWIN,
    write_monai_ssl_file,
    write_volume_published,
    write_volume_shards,
)

from finetune.config import TaskConfig
from finetune.inits import InitSource
from finetune.preprocess3d import VolumePreprocessor
from finetune.runner import finetune_command
from finetune.tasks import load_task
from medssl.errors import MedsslError
from medssl.init import Init


def test_volume_shard_task_loading_and_windowing(tmp_path):
    folder = write_volume_shards(tmp_path / "v")
    task = load_task(TaskConfig(name="vol", kind="shards", path=str(folder)))
    assert task.spatial_dims == 3 and task.source == "volume-shards" and task.task == "binary-class"
    train = task.splits["train"]
    assert len(train) == 24 and train.images[0].shape == (1, 20, 20, 20) and train.images[0].dtype == np.uint16
    assert train.patients is not None and not set(train.patients) & set(task.splits["test"].patients)
    small = load_task(TaskConfig(name="vol", kind="shards", path=str(folder)), side=10)
    assert small.splits["train"].images[0].shape == (1, 10, 10, 10)
    assert small.splits["train"].images[0].dtype == np.uint16
    src = InitSource(Init("random"), "random", 1, (0.5,), (0.25,), None, make=lambda: None,
                     input_size=(8, 8, 8), spatial_dims=3)
    x = VolumePreprocessor(src)(train, np.arange(3))
    assert x.shape == (3, 1, 8, 8, 8)
    assert -2.0 - 1e-5 <= float(x.min()) and float(x.max()) <= 2.0 + 1e-5
    # The window is the sample's own, in HU: stored + offset, then (v - (c - w/2)) / w.
    one = VolumePreprocessor(InitSource(Init("random"), "random", 1, (0.0,), (1.0,), None,
                                        make=lambda: None, input_size=(20, 20, 20), spatial_dims=3))
    hu = train.images[0][0].astype(np.float64) + train.intensity[0][0]
    expected = np.clip((hu - (110.0 - 510.0)) / 1020.0, 0, 1)
    np.testing.assert_allclose(one(train, np.array([0]))[0, 0].numpy(), expected, atol=1e-5)


def _cfg(tmp_path, folder, inits, arch="monai:ResNet", **over):
    cfg = {"output_dir": str(tmp_path / "bench"), "model": {"arch": arch, "kwargs": TINY_RESNET},
           "inits": inits, "tasks": [{"name": "vol", "kind": "shards", "path": str(folder)}],
           "protocols": ["linear", "finetune"], "label_fractions": [1.0], "seeds": [0],
           "input_size": 16, "linear": {"Cs": [0.1, 1.0]}, "finetune": {"epochs": 2, "batch_size": 8},
           "bootstrap": {"n": 50}, "device": "cpu"}
    cfg.update(over)
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_volume_shards_end_to_end(tmp_path):
    folder = write_volume_shards(tmp_path / "v", patients=30)
    pub, _ = write_volume_published(tmp_path / "pub3d", cube=12)
    assert finetune_command(_cfg(tmp_path, folder, ["random", f"ssl:{pub}"]), []) == 0
    out = tmp_path / "bench"
    results = json.loads((out / "results.json").read_text())
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    assert len(ok) == 4 and all(0 <= r["auc"] <= 1 for r in ok)
    info = results["tasks"]["vol"]
    assert info["spatial_dims"] == 3 and info["resampling"]["unit"] == "patients"
    assert info["resampling"]["n_units"] == 6
    for a in results["aggregates"]:
        assert a["resampling"] == "patients" and len(a["auc_ci"]) == 2
    assert "p-" not in json.dumps(results["rows"])       # no pseudonym reaches results
    linear = max(r["auc"] for r in ok if r["protocol"] == "linear")
    assert linear > 0.7
    report = (out / "report.md").read_text()
    assert "**3-D benchmark.**" in report and "## vol" in report


def test_volume_shards_refuse_a_2d_arch_and_2d_weights(tmp_path):
    folder = write_volume_shards(tmp_path / "v", patients=10, per_patient=1, size=8)
    path = _cfg(tmp_path, folder, ["random"], arch="test_efficientnet", model={"arch": "test_efficientnet"})
    with pytest.raises(MedsslError, match="3-D data and model.arch test_efficientnet"):
        finetune_command(path, [])
    pub, _ = write_volume_published(tmp_path / "pub3d")
    path = _cfg(tmp_path, folder, [f"ssl:{pub}"], model={"arch": "test_efficientnet"})
    with pytest.raises(MedsslError, match="3-D weights .*needs 2-D weights"):
        finetune_command(path, [])


def test_monai_ssl_init_benchmarks_swin_unetr(tmp_path):
    """random vs MONAI's Swin UNETR SSL weights (a file in the released layout) on volume shards."""
    weights = tmp_path / "model_swinvit.pt"
    write_monai_ssl_file(weights)
    folder = write_volume_shards(tmp_path / "v", patients=10, per_patient=1, size=20)
    path = _cfg(tmp_path, folder, ["random", f"monai-ssl:{weights}"], input_size=32, protocols=["linear"],
                model={"arch": "monai:SwinUNETR", "kwargs": TINY_SWIN})
    assert finetune_command(path, []) == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    labels = {r["init_label"] for r in results["rows"] if r["status"] == "ok"}
    assert labels == {"random", "monai-ssl:model_swinvit.pt"}
    # The two inits' frozen features differ: the file's weights were used.
    feats = sorted((tmp_path / "bench" / "features").glob("*.npz"))
    assert len(feats) == 2
    a, b = (np.load(f)["test"] for f in feats)
    assert a.shape == b.shape == (2, 192) and not np.allclose(a, b)


def test_bad_network_kwargs_fail_before_any_work(tmp_path):
    folder = write_volume_shards(tmp_path / "v", patients=10, per_patient=1, size=8)
    path = _cfg(tmp_path, folder, ["random"], model={"arch": "monai:ResNet", "kwargs": {"block": "basic"}})
    with pytest.raises(MedsslError, match="model.arch monai:ResNet: .*layers"):
        finetune_command(path, [])
    assert not (tmp_path / "bench" / "cells.jsonl").exists()


def test_3d_weights_pretrained_on_the_tasks_test_split_are_refused(tmp_path):
    """The leakage guard reads a 3-D published dir's record like a 2-D one's."""
    import hashlib

    folder = write_volume_shards(tmp_path / "v", patients=10, per_patient=1, size=8)
    digest = hashlib.sha256((folder / "index.json").read_bytes()).hexdigest()
    pub, _ = write_volume_published(tmp_path / "pub3d", pretraining_data=[
        {"split": "test", "index_sha256": digest, "salt_id": None, "shards": 1, "samples": 2}])
    with pytest.raises(MedsslError, match="pretrained on this task's test split"):
        finetune_command(_cfg(tmp_path, folder, ["random", f"ssl:{pub}"]), [])
    assert not (tmp_path / "bench" / "cells.jsonl").exists()
