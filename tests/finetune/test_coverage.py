"""The benchmark's intervals hold their promised coverage on noise labels with clustered patients.

Simulation, no network: each small cell has 60 test patients x 4 images, one coin-flip label
per patient, and scores that carry no label information but are strongly correlated within a
patient (a patient-level latent, as images of one patient share anatomy and scanner), for two
inits x 3 seeds (seeds differ, inits share part of the latent). Under this null the 95%
interval of AUC should exclude 0.5, and the paired-difference interval should exclude 0, in
about 5% of cells. Resampling patients must hold that (<= 8% over 200 cells); resampling images
as if independent, what finetune/stats.py did before, must not (it excluded ~25%).

Print the measured rates: ``PYTHONPATH=. python tests/finetune/test_coverage.py``.
"""

from __future__ import annotations

import numpy as np

from finetune.stats import Resampling, bootstrap_group, replicate_metrics

TASK = "binary-class"
INITS = ("ssl:a", "random")


def noise_cell(rng: np.random.Generator, n_patients: int = 60, per_patient: int = 4,
               n_seeds: int = 3) -> tuple[np.ndarray, np.ndarray, dict[str, dict[int, np.ndarray]]]:
    """``(labels [N, 1], patients [N], init -> seed -> scores [N, 2])`` with N = n_patients *
    per_patient; labels independent of the scores."""
    y = rng.integers(0, 2, n_patients)
    y[:2] = (0, 1)  # both classes present, so AUC is defined
    labels = np.repeat(y, per_patient)[:, None]
    patients = np.repeat(np.arange(n_patients), per_patient)
    shared = rng.normal(size=n_patients)   # what every init sees in a patient's images
    cells: dict[str, dict[int, np.ndarray]] = {}
    for init in INITS:
        own = rng.normal(size=n_patients)  # what this init's features pick up
        cells[init] = {}
        for seed in range(n_seeds):
            latent = 0.7 * shared + 0.5 * own + 0.3 * rng.normal(size=n_patients)
            logit = np.repeat(latent, per_patient) + 0.2 * rng.normal(size=len(labels))
            p = 1 / (1 + np.exp(-logit))
            cells[init][seed] = np.c_[1 - p, p]
    return labels, patients, cells


def exclusion_rates(by_patient: bool, n_cells: int = 200, n_boot: int = 300,
                    n_seeds: int = 3) -> tuple[float, float]:
    """Fractions of cells whose 95% AUC interval excludes 0.5 (both inits counted) and whose
    paired ssl - random AUC interval excludes 0."""
    rng = np.random.default_rng(2024)
    auc_out = diff_out = 0
    for c in range(n_cells):
        labels, patients, cells = noise_cell(rng, n_seeds=n_seeds)
        # Unit weights give exactly medmnist's point metrics (test_metrics.py checks it) at a
        # fraction of sklearn's cost per call.
        ones = np.ones((1, len(labels)))
        points = {i: {s: tuple(float(m[0]) for m in replicate_metrics(labels, v, TASK, ones))
                      for s, v in d.items()} for i, d in cells.items()}
        resampling = Resampling.of(len(labels), patients if by_patient else None)
        per_init, diffs = bootstrap_group(labels, TASK, cells, points, "ssl:a", n_boot, 0.95,
                                          seed=c, resampling=resampling)
        auc_out += sum(not (per_init[i]["auc"].lo <= 0.5 <= per_init[i]["auc"].hi) for i in INITS)
        d = diffs["random"]["auc"]
        diff_out += not (d.lo <= 0 <= d.hi)
    return auc_out / (len(INITS) * n_cells), diff_out / n_cells


def test_patient_resampling_holds_coverage_and_image_resampling_does_not():
    auc_rate, diff_rate = exclusion_rates(by_patient=True)
    assert auc_rate <= 0.08, auc_rate
    assert diff_rate <= 0.08, diff_rate
    # The same cells resampled by image (the old bootstrap): the test can tell the two apart.
    old_auc, old_diff = exclusion_rates(by_patient=False)
    assert old_auc >= 0.15 and old_diff >= 0.15, (old_auc, old_diff)


def test_single_seed_cluster_bootstrap_is_near_nominal():
    # Without seed resampling (which widens a 3-seed interval) the patient bootstrap alone must
    # be close to 5%: not far too wide (< 1%), not too narrow. The percentile interval runs a
    # little narrow at 60 patients (5.4% for AUC, 6.4% for differences over 1,000 such cells),
    # hence 10% here; the 3-seed test above holds the 8% of the benchmark's real setting.
    auc_rate, diff_rate = exclusion_rates(by_patient=True, n_seeds=1)
    assert 0.01 <= auc_rate <= 0.10, auc_rate
    assert 0.01 <= diff_rate <= 0.10, diff_rate


if __name__ == "__main__":
    for seeds in (3, 1):
        for by_patient in (True, False):
            auc_rate, diff_rate = exclusion_rates(by_patient, n_seeds=seeds)
            print(f"{seeds} seed(s), resampling {'patients' if by_patient else 'images'}: "
                  f"AUC interval excludes 0.5 in {auc_rate:.1%} of intervals, "
                  f"paired difference excludes 0 in {diff_rate:.1%} of cells")
