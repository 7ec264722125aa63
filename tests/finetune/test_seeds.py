"""Seeds carry the variation they claim: random weights per cell seed, one effective seed for a
deterministic protocol, and the report says both."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
import yaml
from finetune_data import ARCH, write_labeled_shards, write_published

from finetune import protocols, runner
from finetune.runner import finetune_command


@pytest.mark.slow
def test_random_weights_vary_by_seed_and_fixed_features_give_one_effective_seed(tmp_path, monkeypatch):
    folder = write_labeled_shards(tmp_path / "s", kind="binary", patients=20, per_patient=2, size=16)
    pub, _ = write_published(tmp_path / "pub")
    out = tmp_path / "bench"
    cfg = {"output_dir": str(out), "model": {"arch": ARCH}, "inits": [f"ssl:{pub}", "random"],
           "tasks": [{"name": "t", "kind": "shards", "path": str(folder)}],
           "protocols": ["knn", "linear"], "label_fractions": [1.0], "seeds": [0, 1, 2],
           "input_size": 16, "linear": {"Cs": [0.1]}, "bootstrap": {"n": 50}, "device": "cpu"}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert finetune_command(path, []) == 0

    # Random weights are drawn from each cell's seed: three random feature sets, all different
    # (plus one for the ssl init, whose features do not depend on the seed).
    feats = sorted((out / "features").glob("t-*.npz"))
    assert len(feats) == 4
    arrays = [np.load(f)["test"] for f in feats]
    assert all(not np.array_equal(a, b) for a, b in combinations(arrays, 2))

    results = json.loads((out / "results.json").read_text())
    rows = [r for r in results["rows"] if r["status"] == "ok"]
    assert len(rows) == 2 * 2 * 3
    preds = {(r["init"], r["protocol"], r["seed"]): np.load(out / "predictions" / f"{r['key']}.npy") for r in rows}
    for protocol in ("knn", "linear"):
        assert not np.array_equal(preds[("random", protocol, 0)], preds[("random", protocol, 1)])
        assert np.array_equal(preds[(f"ssl:{pub}", protocol, 0)], preds[(f"ssl:{pub}", protocol, 2)])

    aggs = {(a["init"], a["protocol"]): a for a in results["aggregates"]}
    for protocol in ("knn", "linear"):
        ssl, rnd = aggs[(f"ssl:{pub}", protocol)], aggs[("random", protocol)]
        assert (ssl["n_seeds"], ssl["n_effective_seeds"]) == (3, 1)  # deterministic at fraction 1.0
        assert (rnd["n_seeds"], rnd["n_effective_seeds"]) == (3, 3)
        assert rnd["diff_vs_ssl"]["n_effective_seeds"] == 3
        assert ssl["resampling"] == "patients" and ssl["n_units"] == 4  # 20 patients, 20% test
    assert results["tasks"]["t"]["resampling"] == {"unit": "patients", "n_units": 4}
    report = (out / "report.md").read_text()
    assert "1 effective seed of 3 run; 4 test patients resampled" in report
    assert "3 effective seeds of 3 run; 4 test patients resampled; difference over 3 distinct seed pairs" in report
    assert "Intervals resample its 4 test patients" in report

    # The run's own seed (the bootstrap's) no longer decides random weights: another run seed
    # reuses every cell and recomputes nothing.
    calls = []
    for name in ("run_knn", "run_linear", "load_init"):
        module = protocols if name.startswith("run_") else runner  # protocols.py runs one cell
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    assert finetune_command(path, ["seed=7"]) == 0
    assert calls == []
