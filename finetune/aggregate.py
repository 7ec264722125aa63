"""Aggregates over seeds: one ``Aggregate`` per task x init x protocol x label fraction.

Each is the mean over effective seeds with a bootstrap interval (finetune/stats.py), and, for
every init but the reference (the first ssl init), the paired difference reference - init.
Each records what its interval resampled (test patients or images, and how many) and over
how many effective seeds it is a mean, since those decide what the interval can claim.
"""

from __future__ import annotations

import numpy as np

from finetune.config import FinetuneRunConfig
from finetune.stats import Resampling, bootstrap_group
from finetune.tasks import TaskData
from medssl.init import reference
from medssl.results import Aggregate, CellRow, Difference


def resampling_of(task: TaskData) -> Resampling:
    """The bootstrap's unit for a task's test split: its patients when the split records them
    (shard tasks), else its images (MedMNIST)."""
    test = task.splits["test"]
    return Resampling.of(len(test), test.patients)


def aggregate_task(task: TaskData, rows: list[CellRow], scores: dict[str, np.ndarray],
                   cfg: FinetuneRunConfig) -> list[Aggregate]:
    """Aggregate rows (status ok) of one task per (protocol, fraction): mean over effective
    seeds with bootstrap CIs, and for each non-reference init the paired difference
    reference - init. Each aggregate records ``resampling`` ("patients" | "images"),
    ``n_units`` (test units resampled), ``n_seeds`` (seeds with a result) and
    ``n_effective_seeds`` (distinct results among them)."""
    labels = task.splits["test"].labels
    resampling = resampling_of(task)
    ref = reference(cfg.inits)
    ref_name = str(ref) if ref is not None else None
    out: list[Aggregate] = []
    for protocol in cfg.protocols:
        for fraction in cfg.label_fractions:
            group = [r for r in rows if r.protocol == protocol and r.fraction == fraction and r.ok
                     and r.fold is None]  # site-shift cells are aggregated under ``shift``
            cells: dict[str, dict[int, np.ndarray]] = {}
            points: dict[str, dict[int, tuple[float, float]]] = {}
            for r in group:
                cells.setdefault(r.init, {})[r.seed] = scores[r.key]
                points.setdefault(r.init, {})[r.seed] = (r.auc, r.acc)
            if not cells:
                continue
            per_init, diffs = bootstrap_group(labels, task.task, cells, points, ref_name,
                                              cfg.bootstrap.n, cfg.bootstrap.confidence, seed=cfg.seed,
                                              resampling=resampling)
            for init in cfg.init_list:
                name = str(init)
                if name not in per_init:
                    continue
                s = per_init[name]
                diff = None
                if name in diffs:
                    d = diffs[name]
                    diff = Difference(reference=ref_name, auc=d["auc"].mean, auc_ci=d["auc"].as_list(),
                                      acc=d["acc"].mean, acc_ci=d["acc"].as_list(), n_seeds=d["n_seeds"],
                                      n_effective_seeds=d["n_effective_seeds"])
                out.append(Aggregate(
                    task=task.name, init=name, init_label=init.label, protocol=protocol,
                    fraction=fraction, auc_mean=s["auc"].mean, auc_ci=s["auc"].as_list(),
                    acc_mean=s["acc"].mean, acc_ci=s["acc"].as_list(), n_seeds=s["n_seeds"],
                    n_effective_seeds=s["n_effective_seeds"], resampling=resampling.unit,
                    n_units=resampling.n_units, diff_vs_ssl=diff))
    return out
