"""Calibration, subgroups and site shift through `medssl finetune`, on shards with attributes.

The shards plant the truths: the label signal lives only in site H1 (H2's images are noise),
sex and age carry no signal, and the LAT view holds class-0 patients only. So site H1's AUC
must be near 1 and H2's near 0.5 with a gap whose interval excludes 0, the LAT group must be
"not estimable", and the fold that holds out H2 (training on H1) must lose AUC.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from finetune_data import ARCH, planted_attributes, write_labeled_shards, write_medmnist_npz, write_published

from finetune import protocols, runner
from finetune.runner import finetune_command
from medssl.errors import MedsslError
from medssl.results import Calibration, Results, Shift, Subgroups

PATIENTS = 120          # 24 test patients: 12 per site, 6 per class and site
PER_PATIENT = 4
SEEDS = [0, 1]
EVALUATION = {"subgroups": ["sex", "age", "site", "view"], "min_subgroup_count": 4, "min_subgroup_per_class": 2,
              "shift": {"attribute": "site", "leave_one_out": True}}


def _config(tmp, shards, inits, out, evaluation=EVALUATION, **extra):
    cfg = {"output_dir": str(out), "model": {"arch": ARCH}, "inits": inits,
           "tasks": [{"name": "t", "kind": "shards", "path": str(shards)}],
           "protocols": ["linear", "knn"], "label_fractions": [0.5, 1.0], "seeds": SEEDS, "input_size": 32,
           "linear": {"Cs": [0.01, 0.1, 1.0]}, "bootstrap": {"n": 200}, "device": "cpu",
           "evaluation": evaluation, **extra}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clinical")
    shards = write_labeled_shards(tmp / "s", kind="binary", patients=PATIENTS, per_patient=PER_PATIENT, size=32,
                                  seed=1, attributes=True, signal_sites={"H1"}, amplitude=60)
    pub, _ = write_published(tmp / "pub")
    out = tmp / "bench"
    config = _config(tmp, shards, [f"ssl:{pub}", "random"], out)
    assert finetune_command(config, []) == 0
    return {"out": out, "config": config, "ssl": f"ssl:{pub}",
            "results": json.loads((out / "results.json").read_text())}


def _agg(results, init, protocol="linear", fraction=1.0):
    return next(a for a in results["aggregates"]
                if a["init"] == init and a["protocol"] == protocol and a["fraction"] == fraction)


@pytest.mark.slow
def test_results_json_carries_calibration_subgroups_and_shift_per_aggregate(planted):
    results = planted["results"]
    aggs = results["aggregates"]
    assert len(aggs) == 2 * 2 * 2  # inits x protocols x fractions
    for a in aggs:
        cal = a["calibration"]
        assert cal["temperature"]["fitted_on"] == "val" and set(cal["temperature"]["per_seed"]) == {"0", "1"}
        for binning in ("width", "mass"):
            for stage in ("before", "after"):
                e = cal["ece"][binning][stage]
                assert 0 <= e["mean"] <= 1 and e["verdict"] in ("within the noise floor", "above the noise floor")
        assert cal["resampling"] == "patients" and cal["n_units"] == 24
        assert set(a["subgroups"]["attributes"]) == {"sex", "age", "site", "view"}
        assert set(a["shift"]["folds"]) == {"H1", "H2"} and a["shift"]["verdict"]
    random = _agg(results, "random")
    assert random["calibration"]["diff_vs_ssl"]["reference"] == planted["ssl"]
    assert "gap_vs_ssl" in random["subgroups"]["attributes"]["site"]
    assert "drop_vs_ssl" in random["shift"]["folds"]["H2"]
    # Fold cells are rows of their own; the in-distribution aggregates count only their own.
    folds = [r for r in results["rows"] if r["fold"]]
    assert {r["fold"] for r in folds} == {"site=H1", "site=H2"}
    assert len(folds) == 2 * 2 * 2 * len(SEEDS) * 2 and len(results["rows"]) == len(folds) * 3 // 2
    assert all(a["n_seeds"] == len(SEEDS) for a in aggs)
    # The record reads back typed.
    typed = Results.read(planted["out"] / "results.json")
    agg = typed.aggregates[0]
    assert isinstance(agg.calibration, Calibration) and isinstance(agg.subgroups, Subgroups)
    assert isinstance(agg.shift, Shift) and agg.calibration.ece_of("width", "after")[0] is not None
    assert not re.search(r"p-[0-9a-f]{16}", json.dumps(results))  # no patient pseudonym reaches the results


@pytest.mark.slow
def test_planted_site_only_signal_shows_in_the_subgroup_gap_and_the_shift_drop(planted):
    results = planted["results"]
    for init in (planted["ssl"], "random"):
        site = _agg(results, init)["subgroups"]["attributes"]["site"]
        assert site["groups"]["H1"]["auc"]["mean"] > 0.9
        lo, hi = site["groups"]["H2"]["auc"]["ci"]
        assert lo < 0.5 < hi, site["groups"]["H2"]
        gap = site["gap"]["auc"]
        assert (gap["max_group"], gap["min_group"]) == ("H1", "H2") and gap["ci"][0] > 0.2
        # No signal depends on sex: its gap interval reaches 0.
        assert _agg(results, init)["subgroups"]["attributes"]["sex"]["gap"]["auc"]["ci"][0] == 0
        # The LAT view holds class 0 only: not estimable, and no number stands in for it.
        lat = _agg(results, init)["subgroups"]["attributes"]["view"]["groups"]["LAT"]
        assert lat["status"] == "not estimable" and "one class only" in lat["reason"]
        assert not {"auc", "acc", "sensitivity", "specificity"} & set(lat)
        # Holding out H2 trains on H1, where the signal is: the AUC drops at the noise site.
        fold = _agg(results, init)["shift"]["folds"]["H2"]
        assert fold["auc_in"]["mean"] > 0.9 and fold["drop"]["ci"][0] > 0.2
    report = (planted["out"] / "report.md").read_text()
    for section in ("## Calibration", "## Subgroups", "## Site shift"):
        assert section in report
    calibration = report.split("## Calibration")[1].split("## Subgroups")[0]
    assert "Verdict: before temperature scaling" in calibration and "noise floor" in calibration
    subgroups = report.split("## Subgroups")[1].split("## Site shift")[0]
    assert "site: the groups clearly differ for every init (H1 above H2)" in subgroups
    assert "sex: no clear difference between groups for any init" in subgroups
    assert "not estimable: one class only" in subgroups
    assert "no clear difference in the gap against random" in subgroups or "the gap relative to random" in subgroups
    shift = report.split("## Site shift")[1]
    assert "When site H2 is held out" in shift and "Verdict: " in shift
    plots = planted["out"] / "plots"
    for name in ("t-linear-reliability.png", "t-knn-reliability.png", "t-linear-subgroups.png", "t-knn-subgroups.png"):
        assert (plots / name).stat().st_size > 1000


@pytest.mark.slow
def test_a_fold_trains_and_selects_without_the_held_out_site(planted):
    out, results = planted["out"], planted["results"]
    split_of = {p: ("train" if p % 5 < 3 else "val" if p % 5 == 3 else "test") for p in range(PATIENTS)}
    at_h1 = {s: PER_PATIENT * sum(split_of[p] == s and planted_attributes(p)[0]["site"] == "H1"
                                  for p in range(PATIENTS)) for s in ("train", "val", "test")}
    fold = [r for r in results["rows"] if r["fold"] == "site=H2" and r["fraction"] == 1.0]
    assert fold and all(r["n_train"] == at_h1["train"] for r in fold)
    for r in fold:
        assert len(np.load(out / "predictions" / f"{r['key']}.val.npy")) == at_h1["val"]
        assert len(np.load(out / "predictions" / f"{r['key']}.npy")) == 2 * at_h1["test"]  # whole test split
    entry = _agg(results, "random")["shift"]["folds"]["H2"]
    assert entry["n"] == {"train": at_h1["train"], "val": at_h1["val"], "test_in": at_h1["test"],
                          "test_out": at_h1["test"]}
    # In-distribution cells select on the whole validation split.
    ind = next(r for r in results["rows"] if r["fold"] is None)
    assert len(np.load(out / "predictions" / f"{ind['key']}.val.npy")) == 2 * at_h1["val"]


@pytest.mark.slow
def test_rerun_redoes_nothing(planted, monkeypatch):
    out = planted["out"]
    lines = (out / "cells.jsonl").read_text().count("\n")
    calls = []
    for module, name in ((protocols, "run_knn"), (protocols, "run_linear"), (runner, "load_init")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    assert finetune_command(planted["config"], []) == 0
    assert calls == [] and (out / "cells.jsonl").read_text().count("\n") == lines
    again = json.loads((out / "results.json").read_text())
    assert [a["calibration"]["ece"] for a in again["aggregates"]] == \
        [a["calibration"]["ece"] for a in planted["results"]["aggregates"]]
    assert [a["shift"] for a in again["aggregates"]] == [a["shift"] for a in planted["results"]["aggregates"]]


def test_a_cell_without_validation_scores_is_redone(tmp_path, monkeypatch):
    shards = write_labeled_shards(tmp_path / "s", kind="binary", patients=20, per_patient=2, size=16)
    out = tmp_path / "bench"
    config = _config(tmp_path, shards, ["random"], out, evaluation={}, protocols=["knn"], label_fractions=[1.0],
                     input_size=16, bootstrap={"n": 20})
    assert finetune_command(config, []) == 0
    first = json.loads((out / "results.json").read_text())["rows"]
    # A cell finished before validation scores were kept: its test scores only.
    (out / "predictions" / f"{first[0]['key']}.val.npy").unlink()
    calls = []
    real = protocols.run_knn
    monkeypatch.setattr(protocols, "run_knn", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert finetune_command(config, []) == 0
    assert len(calls) == 1 and (out / "predictions" / f"{first[0]['key']}.val.npy").is_file()
    again = json.loads((out / "results.json").read_text())
    assert [r["auc"] for r in again["rows"]] == [r["auc"] for r in first]  # same cell, same result
    assert all(a["calibration"] is not None for a in again["aggregates"])


def _cli(config):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "medssl", "finetune", str(config)], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("evaluation, fragment", [
    ({"subgroups": ["site"]}, "evaluation.subgroups needs 'site', which no test image of"),
    ({"shift": {"leave_one_out": True}}, "evaluation.shift needs 'site', which no train image of"),
])
def test_subgroups_or_shift_on_a_task_without_attributes_fail_before_work_in_one_line(tmp_path, evaluation,
                                                                                     fragment):
    shards = write_labeled_shards(tmp_path / "s", kind="binary", patients=10, per_patient=1, size=16)
    out = tmp_path / "bench"
    proc = _cli(_config(tmp_path, shards, ["random"], out, evaluation=evaluation))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "records no attributes" in lines[0], proc.stderr
    assert not (out / "cells.jsonl").exists() and not (out / "features").exists()


def test_a_held_out_site_the_task_lacks_fails_before_work(tmp_path):
    shards = write_labeled_shards(tmp_path / "s", kind="binary", patients=20, per_patient=1, size=16,
                                  attributes=True)
    out = tmp_path / "bench"
    config = _config(tmp_path, shards, ["random"], out, evaluation={"shift": {"holdout": ["H9"]}})
    with pytest.raises(MedsslError, match=r"holdout \['H9'\] not found in 'site'; the task has \['H1', 'H2'\]"):
        finetune_command(config, [])
    assert not (out / "cells.jsonl").exists()


def test_medmnist_with_subgroups_fails_before_any_output(tmp_path):
    root = tmp_path / "m"
    write_medmnist_npz(root, "breastmnist")
    out = tmp_path / "bench"
    cfg = {"output_dir": str(out), "model": {"arch": ARCH}, "inits": ["random"],
           "tasks": [{"name": "breast", "kind": "medmnist", "flag": "breastmnist", "root": str(root)}],
           "protocols": ["knn"], "label_fractions": [1.0], "seeds": [0], "input_size": 28, "device": "cpu",
           "evaluation": {"subgroups": ["sex"]}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(MedsslError, match="tasks: breast: evaluation needs per-image sex, and MedMNIST records "
                                          "no attributes"):
        finetune_command(path, [])
    assert not out.exists()


@pytest.mark.slow
def test_older_results_without_clinical_entries_still_read(planted, tmp_path):
    data = json.loads((planted["out"] / "results.json").read_text())
    for a in data["aggregates"]:
        for key in ("calibration", "subgroups", "shift"):
            a.pop(key)
    for r in data["rows"]:
        r.pop("fold")
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    results = Results.read(old)
    assert all(a.calibration is None and a.subgroups is None and a.shift is None for a in results.aggregates)
    assert all(r.fold is None for r in results.rows)
