"""3-D MedMNIST end to end: synthetic npz files of the official shapes and split sizes, a tiny
MONAI ResNet, random vs 3-D ssl weights, linear probe and full fine-tuning at two label
fractions and two seeds -> results.json with medmnist's own metric values, intervals, report."""

from __future__ import annotations

import json

import medmnist
import numpy as np
import pytest
import yaml
from volume_data import TINY_RESNET, write_medmnist3d_npz, write_volume_published

from finetune.config import FinetuneRunConfig, TaskConfig
from finetune.runner import finetune_command
from finetune.tasks import load_task
from medssl.config import build
from medssl.errors import ConfigError

FLAG = "fracturemnist3d"     # the smallest of the six (1,370 volumes), three classes


def _config(tmp_path, root, inits, **over):
    cfg = {
        "output_dir": str(tmp_path / "bench"),
        "model": {"arch": "monai:ResNet"},
        "inits": inits,
        "tasks": [{"name": FLAG, "flag": FLAG, "root": str(root), "size": 28}],
        "protocols": ["linear", "finetune"],
        "label_fractions": [0.1, 1.0],
        "seeds": [0, 1],
        "input_size": 16,
        "linear": {"Cs": [0.1, 1.0]},
        "finetune": {"epochs": 1, "batch_size": 64, "hflip": True},
        "bootstrap": {"n": 50},
        "feature_batch_size": 128,
        "device": "cpu",
    }
    cfg.update(over)
    return cfg


def test_medmnist3d_loads_with_medmnist_classes(tmp_path):
    write_medmnist3d_npz(tmp_path / "mm", FLAG)
    task = load_task(TaskConfig(name=FLAG, flag=FLAG, root=str(tmp_path / "mm")))
    assert task.spatial_dims == 3 and task.task == "multi-class" and task.n_classes == 3
    for split, n in medmnist.INFO[FLAG]["n_samples"].items():
        assert task.splits[split].images.shape == (n, 1, 28, 28, 28)
        assert task.splits[split].images.dtype == np.uint8
    # Not the official file: medmnist's own split-size check, as one line.
    from medssl.errors import MedsslError

    write_medmnist3d_npz(tmp_path / "bad", FLAG, sizes={"train": 10, "val": 5, "test": 5})
    with pytest.raises(MedsslError, match="has 10 train images, medmnist expects 1027"):
        load_task(TaskConfig(name=FLAG, flag=FLAG, root=str(tmp_path / "bad")))


@pytest.mark.slow
def test_medmnist3d_end_to_end(tmp_path):
    root = tmp_path / "mm"
    write_medmnist3d_npz(root, FLAG)
    pub, _ = write_volume_published(tmp_path / "pub3d")
    cfg = _config(tmp_path, root, ["random", f"ssl:{pub}"])
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert finetune_command(path, []) == 0
    out = tmp_path / "bench"
    results = json.loads((out / "results.json").read_text())
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    assert len(ok) == 2 * 2 * 2 * 2            # inits x protocols x fractions x seeds
    assert results["tasks"][FLAG]["spatial_dims"] == 3
    assert results["tasks"][FLAG]["n"] == medmnist.INFO[FLAG]["n_samples"]
    # Every stored metric is what medmnist's Evaluator says for the stored predictions.
    evaluator = medmnist.Evaluator(FLAG, "test", root=str(root))
    for r in ok:
        scores = np.load(out / "predictions" / f"{r['key']}.npy")
        assert scores.shape == (240, 3)
        expected = evaluator.evaluate(scores)
        assert r["auc"] == pytest.approx(expected.AUC) and r["acc"] == pytest.approx(expected.ACC)
    # The volumes carry signal: a full-data linear probe on frozen 3-D features finds it.
    best = max(r["auc"] for r in ok if r["protocol"] == "linear" and r["fraction"] == 1.0)
    assert best > 0.7
    aggs = results["aggregates"]
    assert {(a["init_label"], a["protocol"], a["fraction"]) for a in aggs} == {
        (i, p, f) for i in ("random", "ssl:pub3d") for p in ("linear", "finetune") for f in (0.1, 1.0)}
    for a in aggs:
        lo, hi = a["auc_ci"]
        assert lo <= a["auc_mean"] <= hi and lo < hi
        assert a["calibration"] is not None
    report = (out / "report.md").read_text()
    assert "**3-D benchmark.**" in report and f"## {FLAG}" in report
    assert (out / "plots" / f"{FLAG}.png").is_file()
    # A re-run reuses every cell.
    assert finetune_command(path, []) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in again["rows"]] == [r["key"] for r in results["rows"]]


def test_3d_config_refusals(tmp_path):
    root = tmp_path / "mm"
    root.mkdir()

    def check(match, **over):
        cfg = _config(tmp_path, root, over.pop("inits", ["random"]), **over)
        with pytest.raises(ConfigError, match=match):
            build(FinetuneRunConfig, cfg)

    check("imagenet has no 3-D weights", inits=["random", "imagenet"])
    check("fracturemnist3d is 3-D, model.arch resnet18 is not", model={"arch": "resnet18"})
    check("breastmnist is 2-D", tasks=[{"name": "b", "flag": "breastmnist", "root": str(root)}])
    check("3-D MedMNIST size must be 28 or 64",
          tasks=[{"name": FLAG, "flag": FLAG, "root": str(root), "size": 128}])
    check("set model.arch=monai:SwinUNETR", inits=["random", "monai-ssl:/w/model_swinvit.pt"])
    check("not supported for 3-D", evaluation={"explain": {}})
    check("side of the input cube", input_size=224)
    check("model.kwargs is for 3-D", model={"arch": "resnet18", "kwargs": TINY_RESNET},
          tasks=[{"name": "b", "flag": "breastmnist", "root": str(root)}])


def test_3d_configs_validate_and_64_reads_its_own_file(tmp_path):
    from pathlib import Path

    from medssl.config import load_config
    from medssl.errors import MedsslError

    repo = Path(__file__).resolve().parents[2]
    for name in ("medmnist3d", "medmnist3d_64", "demo3d"):
        cfg = load_config(FinetuneRunConfig, repo / "configs" / "finetune" / f"{name}.yaml", [])
        assert cfg.model.arch.startswith("monai:") and "imagenet" not in cfg.inits
    cfg = _config(tmp_path, tmp_path, ["random"],
                  tasks=[{"name": "f64", "flag": FLAG, "root": str(tmp_path), "size": 64}])
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(MedsslError, match="fracturemnist3d_64.npz not found"):
        finetune_command(path, [])
