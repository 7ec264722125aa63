"""What the bootstrap resamples: patients where known, images otherwise; effective seeds only."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.aggregate import aggregate_task
from finetune.config import BootstrapConfig, FinetuneRunConfig, TaskConfig
from finetune.metrics import evaluate
from finetune.stats import Resampling, bootstrap_group, effective_seeds
from finetune.tasks import Split, TaskData
from medssl.results import CellRow

INITS = ["ssl:pub", "random"]


def _cfg(seeds=(0, 1, 2), n_boot=300) -> FinetuneRunConfig:
    return FinetuneRunConfig(tasks=[TaskConfig(name="t", kind="shards", path="unused")], inits=INITS,
                             protocols=["linear"], label_fractions=[1.0], seeds=list(seeds),
                             bootstrap=BootstrapConfig(n=n_boot))


def _task(labels: np.ndarray, patients: np.ndarray | None) -> TaskData:
    n = len(labels)
    split = Split(images=np.zeros((n, 2, 2, 1), np.uint8), labels=labels, patients=patients)
    return TaskData(name="t", task="binary-class", n_classes=2, channels=1,
                    source="medmnist" if patients is None else "grayscale-shards",
                    splits={"train": split, "val": split, "test": split})


def _rows(labels: np.ndarray, per_init: dict[str, dict[int, np.ndarray]]):
    rows, scores = [], {}
    for init, by_seed in per_init.items():
        for seed, s in by_seed.items():
            auc, acc = evaluate(labels, s, "binary-class")
            key = f"{init}-{seed}"
            rows.append(CellRow(task="t", init=init, init_label=init, protocol="linear", fraction=1.0,
                                seed=seed, n_train=10, status="ok", auc=auc, acc=acc, key=key))
            scores[key] = s
    return rows, scores


def _patient_scores(rng, n_patients: int, labels: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """Per-patient scores with some signal, distinct per init and seed: ``[n_patients, 2]``."""
    out = {}
    for init, signal in (("ssl:pub", 0.8), ("random", 0.2)):
        out[init] = {}
        for seed in range(3):
            p = 1 / (1 + np.exp(-(signal * (2 * labels[:, 0] - 1) + rng.normal(size=n_patients))))
            out[init][seed] = np.c_[1 - p, p]
    return out


def test_identical_images_per_patient_give_the_one_image_per_patient_interval():
    rng = np.random.default_rng(0)
    n_patients, k = 40, 4
    labels = rng.integers(0, 2, (n_patients, 1))
    scores = _patient_scores(rng, n_patients, labels)
    one = aggregate_task(_task(labels, np.array([f"p{i}" for i in range(n_patients)])),
                         *_rows(labels, scores), _cfg())
    # The same patients, each with k identical images (ids not sorted, to test the mapping).
    order = rng.permutation(n_patients * k)
    rep_labels = np.repeat(labels, k, axis=0)[order]
    rep_patients = np.repeat(np.array([f"p{i}" for i in range(n_patients)]), k)[order]
    rep_scores = {i: {s: np.repeat(v, k, axis=0)[order] for s, v in d.items()} for i, d in scores.items()}
    many = aggregate_task(_task(rep_labels, rep_patients), *_rows(rep_labels, rep_scores), _cfg())
    assert len(one) == len(many) == 2
    for a, b in zip(one, many):
        assert a.resampling == b.resampling == "patients"
        assert a.n_units == b.n_units == n_patients
        for key in ("auc", "acc"):
            assert getattr(b, f"{key}_mean") == pytest.approx(getattr(a, f"{key}_mean"), abs=1e-12)
            assert getattr(b, f"{key}_ci") == pytest.approx(getattr(a, f"{key}_ci"), abs=1e-12)
    diff_one, diff_many = one[1].diff_vs_ssl, many[1].diff_vs_ssl
    assert diff_many.auc_ci == pytest.approx(diff_one.auc_ci, abs=1e-12)
    assert diff_many.acc_ci == pytest.approx(diff_one.acc_ci, abs=1e-12)
    # Resampling those images as if independent would have claimed a much narrower interval.
    naive = aggregate_task(_task(rep_labels, None), *_rows(rep_labels, rep_scores), _cfg())
    assert naive[0].resampling == "images" and naive[0].n_units == n_patients * k
    width = lambda a: a.auc_ci[1] - a.auc_ci[0]
    assert width(naive[0]) < 0.7 * width(many[0])


def test_medmnist_task_resamples_images():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (120, 1))
    aggs = aggregate_task(_task(labels, None), *_rows(labels, _patient_scores(rng, 120, labels)), _cfg())
    assert {a.resampling for a in aggs} == {"images"} and {a.n_units for a in aggs} == {120}


def test_cluster_weights_are_patient_counts():
    units = Resampling.of(6, np.array(["b", "a", "b", "c", "a", "b"]))
    assert units.unit == "patients" and units.n_units == 3
    w = units.weights(np.random.default_rng(0), 50)
    assert w.shape == (50, 6)
    assert np.array_equal(w[:, 0], w[:, 2]) and np.array_equal(w[:, 0], w[:, 5])  # patient b
    assert np.array_equal(w[:, 1], w[:, 4])                                      # patient a
    assert np.all(w[:, [1, 0, 3]].sum(axis=1) == 3)  # 3 patients drawn per replicate
    with pytest.raises(ValueError, match="5 patient ids for 6"):
        Resampling.of(6, np.array(["a"] * 5))


def test_identical_seed_results_count_once_and_pairs_stay_paired():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, (150, 1))
    fixed = _patient_scores(rng, 150, labels)["ssl:pub"][0]
    varied = _patient_scores(rng, 150, labels)["random"]
    cells = {"ssl:pub": {s: fixed.copy() for s in range(3)}, "random": varied}
    points = {i: {s: evaluate(labels, v, "binary-class") for s, v in d.items()} for i, d in cells.items()}
    assert effective_seeds(cells["ssl:pub"]) == {0: 0, 1: 0, 2: 0}
    assert effective_seeds(varied) == {0: 0, 1: 1, 2: 2}
    per_init, diffs = bootstrap_group(labels, "binary-class", cells, points, "ssl:pub", 200, 0.95)
    assert per_init["ssl:pub"]["n_seeds"] == 3 and per_init["ssl:pub"]["n_effective_seeds"] == 1
    assert per_init["random"]["n_effective_seeds"] == 3
    assert diffs["random"]["n_seeds"] == 3 and diffs["random"]["n_effective_seeds"] == 3
    # One effective seed is exactly a one-seed cell: the copies add no pretended seed variation.
    single = {"ssl:pub": {0: fixed}, "random": varied}
    single_points = {"ssl:pub": {0: points["ssl:pub"][0]}, "random": points["random"]}
    per_single, _ = bootstrap_group(labels, "binary-class", single, single_points, "ssl:pub", 200, 0.95)
    assert per_init["ssl:pub"]["auc"] == per_single["ssl:pub"]["auc"]
    # Pairs (ssl seed s, random seed s): with ssl's seeds identical, the difference is ssl - each
    # random seed, whichever ssl seed it is paired with.
    assert diffs["random"]["auc"].mean == pytest.approx(
        points["ssl:pub"][0][0] - np.mean([points["random"][s][0] for s in range(3)]))
    # Two seeds of three identical: two effective seeds, the mean weighs each distinct result once.
    two = {0: varied[0], 1: varied[1], 2: varied[1].copy()}
    per_two, _ = bootstrap_group(labels, "binary-class", {"random": two},
                                 {"random": {s: evaluate(labels, v, "binary-class") for s, v in two.items()}},
                                 None, 100, 0.95)
    assert per_two["random"]["n_effective_seeds"] == 2
    assert per_two["random"]["auc"].mean == pytest.approx(np.mean([points["random"][s][0] for s in (0, 1)]))
