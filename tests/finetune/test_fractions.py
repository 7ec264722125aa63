"""Label fractions: stratified, whole patients, at least one per class, seeded, paired."""

from __future__ import annotations

import numpy as np

from finetune.fractions import draw_subset


def test_stratified_and_deterministic():
    labels = np.r_[np.zeros(900), np.ones(90), np.full(10, 2)].astype(int)[:, None]
    a = draw_subset(labels, 0.1, seed=0)
    counts = np.bincount(labels[a, 0], minlength=3)
    assert counts.tolist() == [90, 9, 1]  # each class at its own 10%
    assert np.array_equal(a, draw_subset(labels, 0.1, seed=0))
    assert not np.array_equal(a, draw_subset(labels, 0.1, seed=1))
    assert len(draw_subset(labels, 1.0, seed=3)) == 1000


def test_every_class_kept_at_one_percent():
    labels = np.r_[np.zeros(990), np.ones(5), np.full(5, 2)].astype(int)[:, None]
    idx = draw_subset(labels, 0.01, seed=0)
    assert set(labels[idx, 0]) == {0, 1, 2}


def test_whole_patients_only():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(100), 5).astype(str)
    labels = np.repeat(rng.integers(0, 2, 100), 5)[:, None]
    idx = draw_subset(labels, 0.2, seed=2, patients=patients)
    chosen = set(patients[idx])
    assert all((patients[idx] == p).sum() == 5 for p in chosen)  # no patient split
    assert 15 <= len(chosen) <= 25
    assert set(labels[idx, 0]) == {0, 1}


def test_multilabel_keeps_each_label():
    rng = np.random.default_rng(0)
    labels = (rng.random((1000, 6)) < 0.02).astype(int)
    labels[:3, 5] = 1
    idx = draw_subset(labels, 0.01, seed=0, multilabel=True)
    assert labels[idx].sum(axis=0).min() >= 1
    assert len(idx) < 60
