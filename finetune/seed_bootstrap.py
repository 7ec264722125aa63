"""The bootstrap of finetune/stats.py for any set of metrics: test units and effective seeds.

``stats.bootstrap_group`` is written for one pair of metrics (AUC, ACC) on one test set. The
clinical figures (calibration error, per-subgroup metrics and their gaps, the site-shift drop)
need the same construction for other metrics and, for site shift, for two disjoint test sets
at once. This module is that construction with the metric left open:

- each replicate draws test weights once (``draw``: e.g. ``Resampling.weights``, patients where
  known) and every init and seed is scored under those same weights, so differences between
  inits are paired on the test draws;
- the mean over seeds resamples EFFECTIVE seeds (``stats.effective_seeds``: seeds whose test
  predictions are identical count once), and a difference between two inits resamples their
  distinct (seed, seed) pairs, as ``bootstrap_group`` does;
- a replicate that leaves a metric undefined (NaN, e.g. no positive drawn) is dropped from
  that metric's interval only (``stats._interval``), and intervals are percentile intervals,
  as the AUC's. The resampled means themselves are kept (``SeedSummary.replicates``): a
  statistic over several metrics at once (the largest gap between subgroups) needs them jointly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from finetune.stats import Summary, _interval, effective_seeds

#: ``replicate(init, seed, draws)`` -> metric name -> ``[b]`` values under the b weight rows.
Replicate = Callable[[str, int, Any], dict[str, np.ndarray]]
#: ``point(init, seed)`` -> metric name -> the point estimate on the observed test set.
Point = Callable[[str, int], dict[str, float]]
#: ``draw(rng, b)`` -> whatever ``replicate`` reads as the weights of b replicates.
Draw = Callable[[np.random.Generator, int], Any]


@dataclass
class SeedSummary:
    """Means over effective seeds (or over distinct seed pairs, for a difference)."""

    metrics: dict[str, Summary]
    n_seeds: int
    n_effective_seeds: int
    #: metric -> ``[n_boot]`` resampled means; replicate b of every metric and init shares the
    #: test draw b (so joint statistics across metrics and inits are paired).
    replicates: dict[str, np.ndarray]


def bootstrap_seeds(identity: dict[str, dict[int, np.ndarray]], point: Point, replicate: Replicate,
                    draw: Draw, n_boot: int, confidence: float, seed: int = 0, chunk: int = 100,
                    pairs: Sequence[tuple[str, str]] = ()
                    ) -> tuple[dict[str, SeedSummary], dict[tuple[str, str], SeedSummary]]:
    """Bootstrap summaries of every metric ``point``/``replicate`` return, per init and per pair.

    identity: init -> seed -> the array whose exact equality makes two seeds one effective seed
    (the cell's test scores; for site shift both test sets' scores). Every seed of every init
    must give the same metric names. pairs: ``(a, b)`` -> the difference ``a - b`` over the
    seeds both have, paired seed by seed. Returns ``(per_init, diffs)``.
    """
    inits = list(identity)
    rng = np.random.default_rng(seed)
    eff = {i: effective_seeds(identity[i]) for i in inits}
    reps_of = {i: sorted(set(eff[i].values())) for i in inits}
    points = {i: {s: point(i, s) for s in reps_of[i]} for i in inits}
    chunks: dict[str, dict[int, list[dict[str, np.ndarray]]]] = {i: {s: [] for s in reps_of[i]} for i in inits}
    for start in range(0, n_boot, chunk):
        draws = draw(rng, min(chunk, n_boot - start))
        for i in inits:
            for s in reps_of[i]:
                chunks[i][s].append(replicate(i, s, draws))
    reps = {i: {s: {k: np.concatenate([c[k] for c in cs]) for k in cs[0]} for s, cs in d.items()}
            for i, d in chunks.items()}

    def resample_mean(stack: np.ndarray, draw_idx: np.ndarray) -> np.ndarray:
        """stack ``[S, B]`` per effective seed (or pair); draw_idx ``[B, S]`` -> ``[B]`` means."""
        return stack[draw_idx, np.arange(n_boot)[:, None]].mean(axis=1)

    per_init: dict[str, SeedSummary] = {}
    for i in inits:
        seeds = reps_of[i]
        draw_idx = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
        metrics, kept = {}, {}
        for k in points[i][seeds[0]]:
            p = float(np.mean([points[i][s][k] for s in seeds]))
            kept[k] = resample_mean(np.stack([reps[i][s][k] for s in seeds]), draw_idx)
            metrics[k] = _interval(p, kept[k], confidence)
        per_init[i] = SeedSummary(metrics, len(identity[i]), len(seeds), kept)
    diffs: dict[tuple[str, str], SeedSummary] = {}
    for a, b in pairs:
        common = sorted(set(identity.get(a, {})) & set(identity.get(b, {})))
        if not common:
            continue
        # Pairs stay paired: seed s of a against seed s of b, each distinct pair once.
        pair_list = sorted({(eff[a][s], eff[b][s]) for s in common})
        draw_idx = rng.integers(0, len(pair_list), size=(n_boot, len(pair_list)))
        metrics, kept = {}, {}
        for k in points[a][pair_list[0][0]]:
            p = float(np.mean([points[a][sa][k] - points[b][sb][k] for sa, sb in pair_list]))
            kept[k] = resample_mean(np.stack([reps[a][sa][k] - reps[b][sb][k] for sa, sb in pair_list]), draw_idx)
            metrics[k] = _interval(p, kept[k], confidence)
        diffs[(a, b)] = SeedSummary(metrics, len(common), len(pair_list), kept)
    return per_init, diffs


def summary_json(s: Summary, lo: float = -np.inf, hi: float = np.inf) -> dict[str, Any]:
    """``{"mean": float | None, "ci": [lo, hi] | [None, None]}``: NaN becomes null in JSON; values
    are clipped to the metric's range ``[lo, hi]`` (a simultaneous interval can leave it)."""
    def num(v: float) -> float | None:
        return float(np.clip(v, lo, hi)) if np.isfinite(v) else None

    return {"mean": num(s.mean), "ci": [num(s.lo), num(s.hi)]}


def difference_verdict(s: Summary, below: str, above: str, none: str = "no clear difference") -> str:
    """``below`` when the interval lies wholly below 0, ``above`` when wholly above, else ``none``
    (also when there is no interval): words never claim more than the interval allows."""
    if not (np.isfinite(s.lo) and np.isfinite(s.hi)):
        return none
    if s.hi < 0:
        return below
    if s.lo > 0:
        return above
    return none
