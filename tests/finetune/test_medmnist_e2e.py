"""BreastMNIST (official split sizes, synthetic pixels) through `medssl finetune` end to end."""

from __future__ import annotations

import json

import medmnist
import numpy as np
import pytest
import yaml
from finetune_data import write_medmnist_npz

from finetune import protocols, runner
from finetune.runner import finetune_command


def _config(tmp_path, root, **extra):
    cfg = {
        "output_dir": str(tmp_path / "bench"),
        "model": {"arch": "test_efficientnet"},
        "inits": ["imagenet", "random"],
        "tasks": [{"name": "breast", "kind": "medmnist", "flag": "breastmnist", "root": str(root)}],
        "protocols": ["knn", "linear", "finetune"],
        "label_fractions": [0.1, 1.0],
        "seeds": [0],
        "input_size": 32,
        "linear": {"Cs": [0.01, 1.0]},
        "knn": {"k": [5, 20]},
        "finetune": {"epochs": 2, "batch_size": 64, "patience": 1},
        "bootstrap": {"n": 100},
        "device": "cpu",
    }
    cfg.update(extra)
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_breastmnist_end_to_end_and_resume(tmp_path, monkeypatch):
    root = tmp_path / "medmnist"
    write_medmnist_npz(root, "breastmnist")
    config = _config(tmp_path, root)
    assert finetune_command(config, []) == 0
    out = tmp_path / "bench"
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3 * 2  # random: 3 protocols x 2 fractions x 1 seed
    assert {r["protocol"] for r in ok} == {"knn", "linear", "finetune"}
    # ImageNet weights for test_efficientnet are not here (offline): a skip row with the reason.
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) == 6 and all(r["init"] == "imagenet" and "ImageNet" in r["reason"] for r in skipped)
    n_train = {r["fraction"]: r["n_train"] for r in ok}
    assert n_train[1.0] == 546 and 50 <= n_train[0.1] <= 60

    # Every stored metric is what medmnist's Evaluator says for the stored predictions.
    evaluator = medmnist.Evaluator("breastmnist", "test", root=str(root))
    for r in ok:
        scores = np.load(out / "predictions" / f"{r['key']}.npy")
        expected = evaluator.evaluate(scores)
        assert r["auc"] == pytest.approx(expected.AUC) and r["acc"] == pytest.approx(expected.ACC)
    # The synthetic images carry signal: full-data linear probe on random features learns it.
    linear_full = next(r for r in ok if r["protocol"] == "linear" and r["fraction"] == 1.0)
    assert linear_full["auc"] > 0.8

    aggs = results["aggregates"]
    assert {(a["protocol"], a["fraction"]) for a in aggs} == {(p, f) for p in ("knn", "linear", "finetune")
                                                               for f in (0.1, 1.0)}
    assert all(a["auc_ci"][0] <= a["auc_mean"] <= a["auc_ci"][1] for a in aggs)
    # MedMNIST has no patient ids: the bootstrap resamples test images, and says so.
    assert all(a["resampling"] == "images" and a["n_units"] == 156 for a in aggs)
    assert results["tasks"]["breast"]["resampling"] == {"unit": "images", "n_units": 156}
    report = (out / "report.md").read_text()
    assert "## breast" in report and "skipped" in report and "ImageNet" in report
    assert "Intervals resample its 156 test images" in report and "156 test images resampled" in report
    assert (out / "plots" / "breast.png").stat().st_size > 1000

    # Re-run: every finished cell is reused, nothing is recomputed.
    calls = []
    for name in ("run_knn", "run_linear", "run_finetune", "load_init"):
        module = protocols if name.startswith("run_") else runner  # protocols.py runs one cell
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    assert finetune_command(config, []) == 0
    assert calls == ["load_init"]  # only the still-missing imagenet init is retried
    again = json.loads((out / "results.json").read_text())
    assert [r["auc"] for r in again["rows"] if r["status"] == "ok"] == [r["auc"] for r in ok]

    # A setting that changes a cell's meaning is not silently reused: only linear cells rerun.
    calls.clear()
    assert finetune_command(config, ["linear.Cs=[0.1]"]) == 0
    assert sorted(set(calls)) == ["load_init", "run_linear"] and calls.count("run_linear") == 2


def test_missing_npz_names_file_and_source(tmp_path):
    from medssl.errors import MedsslError

    config = _config(tmp_path, tmp_path / "nowhere")
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(MedsslError, match=r"breastmnist\.npz not found.*zenodo"):
        finetune_command(config, [])


def test_wrong_split_size_is_refused(tmp_path):
    from medssl.errors import MedsslError

    root = tmp_path / "m"
    write_medmnist_npz(root, "breastmnist", sizes={"train": 500, "val": 78, "test": 156})
    with pytest.raises(MedsslError, match="medmnist expects 546"):
        finetune_command(_config(tmp_path, root), [])
