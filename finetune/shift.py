"""Site shift as a protocol: train and select on some sites, test on a held-out one.

``evaluation.shift: {attribute: site, holdout: [SITE]}`` (or ``leave_one_out: true``: every
site in turn) makes one FOLD per held-out site. In a fold:

- training and validation use the train / val images of the OTHER sites only, so model
  selection (k, C, the epoch) never sees the held-out hospital;
- two test sets are scored: ``test_in``, the test images of the other sites (in-distribution),
  and ``test_out``, the test images of the held-out site. The held-out site's train and val
  images are not used at all, so the two test sets come from the same split;
- images whose attribute is unknown are left out of the fold (counted), since they cannot be
  placed on either side;
- a patient recorded at the held-out site AND at another site (a transfer) would put the same
  anatomy on both sides: all of that patient's images are removed from the other sites' train,
  val and test_in (counted), so training never sees a held-out patient and the two test sets
  are disjoint in patients.

The protocols themselves (kNN, linear, finetune) run in the runner on these subsets; this
module only picks indices and scores the results.

The drop (``shift_group``): in-distribution AUC - held-out AUC, the mean over effective seeds.
One bootstrap replicate resamples the patients of test_in and of test_out INDEPENDENTLY (the
two sets are disjoint in patients; images where ids are unknown), and every init and seed is
scored on those same draws, so differences between inits' drops are paired. Percentile
intervals (finetune/seed_bootstrap.py). ``shift_verdict`` turns the drops into the sentence
the report prints: an init "loses least" only when its drop is smaller than every other
init's with a paired interval that excludes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from finetune.evaluation_config import ShiftConfig
from finetune.metrics import binary_columns, evaluate
from finetune.seed_bootstrap import bootstrap_seeds, summary_json
from finetune.stats import Resampling, weighted_auc
from finetune.subgroups import attribute_values
from medssl.errors import MedsslError
from medssl.init import Init

SPLITS = ("train", "val", "test")


@dataclass
class ShiftFold:
    """One held-out site. Index arrays are positions in the task's own splits: ``train`` into
    the train split, ``val`` into val, ``test_in`` and ``test_out`` into test."""

    attribute: str
    holdout: str
    train: np.ndarray
    val: np.ndarray
    test_in: np.ndarray
    test_out: np.ndarray
    #: split -> images left out because their attribute is unknown.
    n_missing: dict[str, int] = field(default_factory=dict)
    #: images of other sites removed because their patient also appears at the held-out site.
    n_shared_patient_images: int = 0

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test_in": len(self.test_in),
                "test_out": len(self.test_out)}


def shift_folds(cfg: ShiftConfig, attributes: dict[str, Sequence[Any]],
                patients: dict[str, np.ndarray | None], task_name: str = "task") -> list[ShiftFold]:
    """The folds of ``cfg`` for one task.

    attributes: split ("train", "val", "test") -> ``[N_split]`` values of ``cfg.attribute``
    (str, None where unknown); patients: split -> ``[N_split]`` pseudonyms or None. Raises
    MedsslError (naming the task, the site and the fix) when a held-out site is unknown, or a
    fold would leave a set empty, so a bad config stops before any training.
    """
    missing = [s for s in SPLITS if s not in attributes]
    if missing:
        raise MedsslError(f"{task_name}: evaluation.shift needs {cfg.attribute!r} for every split; "
                          f"none recorded for {', '.join(missing)}")
    vals = {s: attribute_values(attributes[s]) for s in SPLITS}
    known = sorted({v for s in SPLITS for v in vals[s] if v is not None})
    if cfg.leave_one_out:
        holdouts = sorted({v for v in vals["test"] if v is not None})
        if len(known) < 2:
            raise MedsslError(f"{task_name}: evaluation.shift.leave_one_out needs >= 2 values of "
                              f"{cfg.attribute!r}, found {known or 'none'}")
    else:
        holdouts = list(cfg.holdout)
        unknown = [h for h in holdouts if h not in known]
        if unknown:
            raise MedsslError(f"{task_name}: evaluation.shift.holdout {unknown} not found in "
                              f"{cfg.attribute!r}; the task has {known or 'no known values'}")
    folds = []
    for h in holdouts:
        out_mask = vals["test"] == h
        # Patients seen at the held-out site, in any split: none of their images may train,
        # select or stand in the in-distribution test.
        held = set()
        for s in SPLITS:
            if patients.get(s) is not None:
                held |= set(np.asarray(patients[s])[vals[s] == h].tolist())
        idx, n_shared = {}, 0
        for s in SPLITS:
            other = np.array([v is not None and v != h for v in vals[s]], dtype=bool)
            if held and patients.get(s) is not None:
                shared = other & np.isin(np.asarray(patients[s]), list(held))
                n_shared += int(shared.sum())
                other &= ~shared
            idx[s] = np.flatnonzero(other)
        fold = ShiftFold(cfg.attribute, h, idx["train"], idx["val"], idx["test"], np.flatnonzero(out_mask),
                         {s: int(sum(v is None for v in vals[s])) for s in SPLITS}, n_shared)
        empty = [k for k, n in fold.counts().items() if n == 0]
        if empty:
            raise MedsslError(f"{task_name}: evaluation.shift: holding out {cfg.attribute}={h} leaves "
                              f"no image in {', '.join(empty)}; choose another holdout site")
        folds.append(fold)
    return folds


def _auc_reps(labels: np.ndarray, scores: np.ndarray, task: str, weights: np.ndarray) -> np.ndarray:
    return np.mean([weighted_auc(t, s, weights) for t, s in binary_columns(labels, scores, task)], axis=0)


def shift_group(task: str, fold: ShiftFold, labels_in: np.ndarray, labels_out: np.ndarray,
                patients_in: np.ndarray | None, patients_out: np.ndarray | None,
                cells: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]], n_boot: int, confidence: float,
                seed: int = 0, reference: str | None = None) -> dict[str, dict[str, Any]]:
    """The ``shift`` fold entry of each init for one (task, protocol, fraction) and one fold.

    labels_in / labels_out: test labels of ``fold.test_in`` / ``fold.test_out``; patients_*:
    their pseudonyms or None. cells: init -> seed -> (scores on test_in ``[N_in, C]``, scores on
    test_out ``[N_out, C]``) of the model trained and selected on the fold. Each init's entry
    carries ``drop_vs`` (this init's drop - every other init's, paired), which ``shift_verdict``
    reads, and ``drop_vs_ssl`` for the non-reference inits. Schema: docs/results_schema.md.
    """
    res_in = Resampling.of(len(labels_in), patients_in)
    res_out = Resampling.of(len(labels_out), patients_out)
    identity = {i: {s: np.concatenate([a.ravel(), b.ravel()]) for s, (a, b) in d.items()} for i, d in cells.items()}

    def point(i: str, s: int) -> dict[str, float]:
        a = evaluate(labels_in, cells[i][s][0], task)[0]
        b = evaluate(labels_out, cells[i][s][1], task)[0]
        return {"auc_in": a, "auc_out": b, "drop": a - b}

    def draw(rng: np.random.Generator, b: int) -> tuple[np.ndarray, np.ndarray]:
        # Independent draws: test_in and test_out share no patient (shift_folds makes sure).
        return res_in.weights(rng, b), res_out.weights(rng, b)

    def replicate(i: str, s: int, w: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        a = _auc_reps(labels_in, cells[i][s][0], task, w[0])
        b = _auc_reps(labels_out, cells[i][s][1], task, w[1])
        return {"auc_in": a, "auc_out": b, "drop": a - b}

    inits = list(cells)
    pairs = [p for a, b in combinations(inits, 2) for p in ((a, b), (b, a))]
    per_init, diffs = bootstrap_seeds(identity, point, replicate, draw, n_boot, confidence, seed, pairs=pairs)
    out = {}
    for i, summ in per_init.items():
        entry: dict[str, Any] = {
            "attribute": fold.attribute, "holdout": fold.holdout, "n": fold.counts(),
            "n_missing": fold.n_missing, "n_shared_patient_images": fold.n_shared_patient_images,
            "resampling": res_in.unit, "n_units_in": res_in.n_units, "n_units_out": res_out.n_units,
            "n_seeds": summ.n_seeds, "n_effective_seeds": summ.n_effective_seeds,
            **{k: summary_json(summ.metrics[k], *((0, 1) if k != "drop" else ())) for k in ("auc_in", "auc_out", "drop")},
            "drop_vs": {o: {**summary_json(diffs[(i, o)].metrics["drop"]),
                            "n_effective_seeds": diffs[(i, o)].n_effective_seeds}
                        for o in inits if (i, o) in diffs},
        }
        if reference in cells and i != reference and (reference, i) in diffs:
            entry["drop_vs_ssl"] = {"reference": reference, **summary_json(diffs[(reference, i)].metrics["drop"])}
        out[i] = entry
    return out


def _fmt(d: dict) -> str:
    mean, (lo, hi) = d["mean"], d["ci"]
    if mean is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{mean:+.3f}"
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def least_loser(entries: dict[str, dict[str, Any]]) -> str | None:
    """The init whose drop is smaller than every other init's with a paired interval wholly
    below 0, or None when no init is clearly ahead (or only one was run)."""
    if len(entries) < 2:
        return None
    for i, e in entries.items():
        vs = e.get("drop_vs", {})
        if all(o in vs and vs[o]["ci"][1] is not None and vs[o]["ci"][1] < 0 for o in entries if o != i):
            return i
    return None


def shift_verdict(entries: dict[str, dict[str, Any]]) -> str:
    """One plain sentence for one fold from ``shift_group``'s entries (init -> entry).

    An init "loses least" only if, against every other init, its drop minus theirs has an
    interval wholly below 0 (``least_loser``); otherwise the sentence says no init clearly loses
    less and names the smallest point drop as only that. Each init's drop is stated with its
    interval.
    """
    if not entries:
        return "No shift result."
    any_entry = next(iter(entries.values()))
    where = f"{any_entry['attribute']} {any_entry['holdout']} is held out"
    drops = "; ".join(f"{Init.parse(i).label} drops {_fmt(e['drop'])}" for i, e in entries.items())
    if len(entries) == 1:
        return f"When {where}: {drops}."
    best = least_loser(entries)
    if best is not None:
        return f"When {where}, {Init.parse(best).label} loses least (paired intervals exclude 0): {drops}."
    finite = {i: e["drop"]["mean"] for i, e in entries.items() if e["drop"]["mean"] is not None}
    smallest = f" (smallest point drop: {Init.parse(min(finite, key=finite.get)).label})" if finite else ""
    return f"When {where}, no init clearly loses less than the others{smallest}: {drops}."


def overall_shift_verdict(folds: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One sentence over all folds (holdout -> init -> entry): an init loses least overall only
    if it clearly loses least at every held-out site."""
    winners = {least_loser(entries) for entries in folds.values()}
    if len(winners) == 1 and None not in winners:
        return f"{Init.parse(winners.pop()).label} loses least at every held-out site ({len(folds)})."
    return f"No init clearly loses least at every held-out site ({len(folds)}); see the per-site lines."


def shift_entries(per_fold: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The ``shift`` entry of each init's aggregate: per_fold is holdout -> ``shift_group``'s
    result for that fold. Adds each fold's ``verdict`` and the overall one (the same words in
    every init's entry). Schema: docs/results_schema.md."""
    inits = list(dict.fromkeys(i for entries in per_fold.values() for i in entries))
    texts = {h: shift_verdict(entries) for h, entries in per_fold.items()}
    overall = overall_shift_verdict(per_fold)
    attribute = next((e["attribute"] for entries in per_fold.values() for e in entries.values()), None)
    return {i: {"attribute": attribute,
                "folds": {h: {**entries[i], "verdict": texts[h]} for h, entries in per_fold.items() if i in entries},
                "verdict": overall} for i in inits}
