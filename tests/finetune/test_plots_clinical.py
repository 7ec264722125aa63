"""The reliability diagram and the forest plot draw from results.json entries alone."""

from __future__ import annotations

import json

import numpy as np
from scipy.special import expit

from finetune.calibration import calibration_group
from finetune.plots_clinical import plot_forest, plot_reliability
from finetune.stats import Resampling
from finetune.subgroups import subgroup_group


def _entries():
    rng = np.random.default_rng(0)
    n = 400
    z = rng.normal(size=n) * 1.5
    y = (rng.random(n) < expit(z)).astype(int)[:, None]
    cells = {"ssl:/x/pub": {0: np.c_[1 - expit(z), expit(z)]}, "imagenet": {0: np.c_[1 - expit(3 * z), expit(3 * z)]}}
    res = Resampling.of(n, None)
    cal = calibration_group("binary-class", y, y, cells, cells, res, 50, 0.95, reference="ssl:/x/pub")
    site = np.where(np.arange(n) < 390, "A", "B").astype(object)  # B: 10 images, not estimable
    sub = subgroup_group("binary-class", y, y, {"site": site}, cells, cells, res, 50, 0.95, reference="ssl:/x/pub")
    # Through JSON and back, as the report reads them from results.json.
    return json.loads(json.dumps(cal)), json.loads(json.dumps(sub))


def test_figures_are_written_from_json_entries(tmp_path):
    cal, sub = _entries()
    assert sub["imagenet"]["attributes"]["site"]["groups"]["B"]["status"] == "not estimable"
    for binning in ("width", "mass"):
        plot_reliability(tmp_path / f"rel_{binning}.png", "task", cal, binning)
        assert (tmp_path / f"rel_{binning}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_forest(tmp_path / "forest.png", "task", sub)
    assert (tmp_path / "forest.png").stat().st_size > 1000
