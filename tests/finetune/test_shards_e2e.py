"""Labeled shard tasks (multi-class, binary, multi-label) end to end; chance level on noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from finetune_data import write_labeled_shards

from finetune.config import TaskConfig
from finetune.runner import finetune_command
from finetune.tasks import load_task


def _run(tmp_path, tasks, protocols=("linear", "knn"), fractions=(0.5, 1.0), seeds=(0,), n_boot=200):
    cfg = {
        "output_dir": str(tmp_path / "bench"),
        "model": {"arch": "test_efficientnet"},
        "inits": ["random"],
        "tasks": tasks,
        "protocols": list(protocols),
        "label_fractions": list(fractions),
        "seeds": list(seeds),
        "input_size": 32,
        "linear": {"Cs": [0.01, 0.1, 1.0]},
        "finetune": {"epochs": 1, "batch_size": 16},
        "bootstrap": {"n": n_boot},
        "device": "cpu",
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert finetune_command(path, []) == 0
    return json.loads((tmp_path / "bench" / "results.json").read_text())


def test_shard_task_loading_and_windowing(tmp_path):
    folder = write_labeled_shards(tmp_path / "s", kind="multilabel", n_classes=4)
    task = load_task(TaskConfig(name="ml", kind="shards", path=str(folder)))
    assert task.task == "multi-label, binary-class" and task.n_classes == 4 and task.channels == 1
    train = task.splits["train"]
    assert train.labels.shape == (72, 4) and train.patients is not None
    assert len(set(train.patients) & set(task.splits["test"].patients)) == 0
    from finetune.inits import InitSource
    from medssl.init import Init
    from finetune.preprocess import Preprocessor

    small = load_task(TaskConfig(name="ml", kind="shards", path=str(folder)), side=16)
    img = small.splits["train"].images[0]
    assert img.shape == (1, 16, 16) and img.dtype == np.uint16  # shrunk on load, dtype kept
    assert abs(float(img.mean()) - float(train.images[0].mean())) < 0.05 * float(train.images[0].mean())
    src = InitSource(Init("random"), "random", 1, (0.5,), (0.25,), None, make=lambda: None)
    x = Preprocessor(src, 16, "bilinear")(train, np.arange(4))
    assert x.shape == (4, 1, 16, 16)
    assert -2.0 - 1e-5 <= float(x.min()) and float(x.max()) <= 2.0 + 1e-5  # [0,1] window, normalised


@pytest.mark.slow
def test_three_label_types_end_to_end(tmp_path):
    tasks = []
    for kind, n in (("multiclass", 3), ("binary", 2), ("multilabel", 4)):
        folder = write_labeled_shards(tmp_path / kind, kind=kind, n_classes=n, seed=1)
        tasks.append({"name": kind, "kind": "shards", "path": str(folder)})
    results = _run(tmp_path, tasks, protocols=("linear", "knn", "finetune"), fractions=(1.0,))
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    assert len(ok) == 3 * 3
    assert results["tasks"]["multilabel"]["task"] == "multi-label, binary-class"
    for r in ok:
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["acc"] <= 1.0
        assert "p-" not in json.dumps(r)  # no patient pseudonym reaches results
    linear = {r["task"]: r["auc"] for r in ok if r["protocol"] == "linear"}
    assert min(linear.values()) > 0.6  # 24 test images each: chance would sit at 0.5
    report = (tmp_path / "bench" / "report.md").read_text()
    assert all(f"## {k}" in report for k in ("multiclass", "binary", "multilabel"))
    assert all((tmp_path / "bench" / "plots" / f"{k}.png").is_file() for k in ("multiclass", "binary", "multilabel"))


@pytest.mark.slow
def test_linear_probe_near_chance_without_signal(tmp_path):
    noise = write_labeled_shards(tmp_path / "noise", kind="binary", signal=False, patients=60, seed=3)
    signal = write_labeled_shards(tmp_path / "signal", kind="binary", signal=True, patients=60, seed=3)
    results = _run(tmp_path, [{"name": "noise", "kind": "shards", "path": str(noise)},
                              {"name": "signal", "kind": "shards", "path": str(signal)}],
                   protocols=("linear",), fractions=(1.0,), seeds=(0, 1, 2), n_boot=500)
    aggs = {a["task"]: a for a in results["aggregates"]}
    # 60 patients x 4 images, 20% of patients in test: the bootstrap draws the 12 test patients.
    assert all(a["resampling"] == "patients" and a["n_units"] == 12 for a in aggs.values())
    lo, hi = aggs["noise"]["auc_ci"]
    assert lo <= 0.5 <= hi, aggs["noise"]
    assert aggs["signal"]["auc_ci"][0] > 0.6, aggs["signal"]
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "not distinguishable from chance" in report and "above chance" in report
    assert "12 test patients resampled" in report


def test_random_init_features_are_reproducible(tmp_path):
    folder = write_labeled_shards(tmp_path / "s", kind="binary", patients=15, per_patient=2, size=16)
    task = [{"name": "t", "kind": "shards", "path": str(folder)}]
    first = _run(tmp_path / "a", task, protocols=("knn",), fractions=(1.0,), n_boot=20)
    second = _run(tmp_path / "b", task, protocols=("knn",), fractions=(1.0,), n_boot=20)
    assert [r["auc"] for r in first["rows"]] == [r["auc"] for r in second["rows"]]
