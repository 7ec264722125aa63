"""The linear probe as a torch head, localisation scores, map comparison and the verdict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from finetune.explain import (
    ProbeClassifier,
    boxes_to_masks,
    compare_maps,
    energy_inside,
    fit_probe,
    pointing_game,
    probe_head,
    resize_masks,
)
from finetune.explain.grid import display_images, pick_per_class
from finetune.explain.sanity import overall, verdict
from finetune.linear import _scores


def _data(n=300, d=12, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(0, 1, (n, d)) * rng.uniform(0.5, 5, d) + rng.normal(0, 3, d)
    x[:, 0] += 2.0 * y
    return x.astype(np.float32), y[:, None]


@pytest.mark.parametrize("classes", [2, 3])
def test_probe_head_equals_sklearn_predict_proba(classes):
    x, y = _data(classes=classes)
    scaler, clf = fit_probe(x, y, C=0.5, max_iter=500, seed=0, multilabel=False)
    head = probe_head(scaler, clf, classes)
    with torch.no_grad():
        torch_proba = head(torch.from_numpy(x)).softmax(1).numpy()
    want = _scores(clf, scaler.transform(x), classes, multilabel=False)
    np.testing.assert_allclose(torch_proba, want, atol=1e-5)


def test_probe_head_gives_absent_classes_zero_like_linear_py():
    x, y = _data(classes=3)
    keep = y[:, 0] != 1                                      # a subset without class 1
    scaler, clf = fit_probe(x[keep], y[keep], C=1.0, max_iter=500, seed=0, multilabel=False)
    with torch.no_grad():
        proba = probe_head(scaler, clf, 4)(torch.from_numpy(x)).softmax(1).numpy()
    np.testing.assert_allclose(proba, _scores(clf, scaler.transform(x), 4, False), atol=1e-5)
    assert proba[:, 1].max() == 0 and proba[:, 3].max() == 0


def test_probe_head_multilabel_is_sigmoid_per_label():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (200, 8)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0.5, rng.random(200) < 0.3], 1).astype(int)
    scaler, clf = fit_probe(x, y, C=1.0, max_iter=500, seed=0, multilabel=True)
    with torch.no_grad():
        proba = probe_head(scaler, clf, 3)(torch.from_numpy(x)).sigmoid().numpy()
    np.testing.assert_allclose(proba, clf.predict_proba(scaler.transform(x)), atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        probe_head(scaler, clf, 4)


def test_probe_classifier_runs_backbone_then_head():
    x, y = _data(d=6)
    scaler, clf = fit_probe(x, y, C=1.0, max_iter=500, seed=0, multilabel=False)
    model = ProbeClassifier(nn.Identity(), probe_head(scaler, clf, 3))
    with torch.no_grad():
        assert model(torch.from_numpy(x)).argmax(1).numpy().tolist() == clf.predict(
            scaler.transform(x)).tolist()


def test_pointing_game_and_energy():
    masks = boxes_to_masks([(2, 2, 4, 4), (0, 0, 2, 2), (5, 5, 8, 8)], (8, 8))
    maps = np.zeros((3, 8, 8))
    maps[0, 3, 3] = 1.0                       # hit
    maps[1, 4, 4] = 1.0                       # miss: two pixels from the box
    maps[1, 1, 1] = 0.5
    pg = pointing_game(maps, masks)
    assert pg["per_image"] == [True, False, False]   # the flat (all-zero) map never scores
    assert pg["hits"] == 1 and pg["ci"][0] < 1 / 3 < pg["ci"][1]
    # (4, 4) lies sqrt(18) = 4.24 px from the box's nearest pixel (1, 1)
    assert pointing_game(maps, masks, tolerance=4)["per_image"][1] is False
    assert pointing_game(maps, masks, tolerance=5)["per_image"][1] is True
    en = energy_inside(maps, masks)
    assert en["per_image"] == [1.0, pytest.approx(1 / 3, abs=1e-4), 0.0]
    assert en["chance"] == pytest.approx(np.mean([4 / 64, 4 / 64, 9 / 64]))
    with pytest.raises(ValueError, match="empty"):
        pointing_game(maps, np.zeros((3, 8, 8), bool))


def test_resize_masks_keeps_the_box_where_it_is():
    small = boxes_to_masks([(4, 2, 8, 6)], (16, 16))
    big = resize_masks(small, (64, 64))
    assert big.shape == (1, 64, 64)
    ys, xs = np.nonzero(big[0])
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (8, 23, 16, 31)


def test_compare_maps_and_verdicts():
    rng = np.random.default_rng(0)
    a = rng.random((20, 16, 16))
    same = compare_maps(a, a)
    assert same["spearman"] == pytest.approx(1.0) and same["ssim"] == pytest.approx(1.0)
    other = compare_maps(a, rng.random((20, 16, 16)))
    assert abs(other["spearman"]) < 0.1
    flat = compare_maps(a, np.zeros_like(a))
    assert flat["flat"] == 20 and flat["spearman"] == 0
    assert verdict(same, "model")["trustworthy"] is False
    assert verdict(other, "data")["trustworthy"] is True
    straddle = {"spearman": 0.5, "spearman_ci": (0.4, 0.6), "ssim": 0.3, "n": 5}
    v = verdict(straddle, "model")
    assert v["trustworthy"] is None and v["words"].startswith("not shown trustworthy")
    assert overall([verdict(other, "model"), v])["trustworthy"] is None
    assert overall([verdict(other, "model"), verdict(same, "data")])["trustworthy"] is False


def test_pick_per_class_and_display():
    labels = np.array([0, 1, 1, 2, 2, 2, 0, 1])
    idx = pick_per_class(labels[:, None], 2, seed=3)
    assert sorted(labels[idx].tolist()) == [0, 0, 1, 1, 2, 2]
    assert len(set(idx.tolist())) == 6
    x = torch.rand(2, 3, 4, 4)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    norm = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    np.testing.assert_allclose(display_images(norm, mean, std), x.mean(1).numpy(), atol=1e-6)
