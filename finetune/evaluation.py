"""The clinical figures of every aggregate: calibration, subgroups and site shift.

The runner calls, per task: ``check_evaluation`` right after loading it (before any of its
cells run), ``folds_of`` for the site-shift folds, and after its cells ``clinical_aggregates``,
which adds to each (init, protocol, fraction) aggregate

- ``calibration`` (always): finetune/calibration.py on the cells' test scores, temperatures
  fitted on the same models' validation scores;
- ``subgroups`` (``evaluation.subgroups``): finetune/subgroups.py on the test split's attributes,
  operating points chosen on validation;
- ``shift`` (``evaluation.shift``, for the protocols and fractions it covers): finetune/shift.py on
  the fold cells, each scored on the fold's in-distribution and held-out test images.

The layout of each entry is docs/results_schema.md; medssl/results.py types its top level.
"""

from __future__ import annotations

import logging

import numpy as np

from finetune.aggregate import resampling_of
from finetune.calibration import calibration_group
from finetune.config import FinetuneRunConfig
from finetune.evaluation_config import EvaluationConfig
from finetune.shift import ShiftFold, shift_entries, shift_folds, shift_group
from finetune.subgroups import subgroup_group
from finetune.tasks import SPLITS, TaskData
from medssl.errors import MedsslError
from medssl.init import reference
from medssl.results import Aggregate, Calibration, CellRow, Shift, Subgroups

log = logging.getLogger(__name__)


def needed_attributes(ev: EvaluationConfig) -> list[str]:
    """Attributes the evaluation reads: the subgroup ones and the shift's, in that order."""
    names = list(ev.subgroups)
    if ev.shift is not None and ev.shift.attribute not in names:
        names.append(ev.shift.attribute)
    return names


def check_evaluation(task: TaskData, ev: EvaluationConfig, where: str) -> None:
    """Raise MedsslError (one line naming the task, the attribute and the fix) when the task
    records an attribute the evaluation needs in no image: a subgroup attribute in no test
    image, the shift's in no image of some split. ``where`` names the task's source."""
    fix = "re-shard with a recipe that records it, or remove it from the config's evaluation block"
    for name in ev.subgroups:
        values = task.splits["test"].attributes.get(name)
        if values is None or all(v is None for v in values):
            raise MedsslError(f"tasks: {task.name}: evaluation.subgroups needs {name!r}, which no test "
                              f"image of {where} records ({_recorded(task)}); {fix}")
    if ev.shift is not None:
        name = ev.shift.attribute
        for split in SPLITS:
            values = task.splits[split].attributes.get(name)
            if values is None or all(v is None for v in values):
                raise MedsslError(f"tasks: {task.name}: evaluation.shift needs {name!r}, which no {split} "
                                  f"image of {where} records ({_recorded(task)}); {fix}")


def _recorded(task: TaskData) -> str:
    names = sorted({k for s in task.splits.values() for k in s.attributes})
    return f"it records {', '.join(names)}" if names else "it records no attributes"


def fold_name(fold: ShiftFold) -> str:
    """A fold's name in cell rows and keys: ``"{attribute}={held-out value}"``."""
    return f"{fold.attribute}={fold.holdout}"


def folds_of(task: TaskData, ev: EvaluationConfig) -> list[ShiftFold]:
    """The site-shift folds of a task ([] without ``evaluation.shift``); MedsslError for a
    held-out value the task does not have, or a fold that would leave a set empty."""
    if ev.shift is None:
        return []
    attribute = ev.shift.attribute
    folds = shift_folds(ev.shift, {s: task.splits[s].attributes[attribute] for s in SPLITS},
                        {s: task.splits[s].patients for s in SPLITS}, task.name)
    for f in folds:
        log.info("%s: shift fold %s: %s", task.name, fold_name(f), f.counts())
    return folds


def clinical_aggregates(task: TaskData, aggregates: list[Aggregate], rows: list[CellRow],
                        scores: dict[str, np.ndarray], val_scores: dict[str, np.ndarray],
                        cfg: FinetuneRunConfig, folds: list[ShiftFold]) -> list[Aggregate]:
    """``aggregates`` of one task with ``calibration``, ``subgroups`` and ``shift`` filled in.

    rows: every row of the task, in-distribution and fold cells; scores / val_scores: key ->
    test ``[N_test, C]`` / validation scores of its ok cells. Aggregates are changed in place
    and returned.
    """
    ev = cfg.evaluation
    ref = reference(cfg.inits)
    ref_name = str(ref) if ref is not None else None
    test, val = task.splits["test"], task.splits["val"]
    resampling = resampling_of(task)
    boot = {"n_boot": cfg.bootstrap.n, "confidence": cfg.bootstrap.confidence, "seed": cfg.seed,
            "reference": ref_name}
    order = [str(i) for i in cfg.init_list]
    for protocol in cfg.protocols:
        for fraction in cfg.label_fractions:
            aggs = {a.init: a for a in aggregates if a.protocol == protocol and a.fraction == fraction}
            group = [r for r in rows if r.fold is None and r.protocol == protocol and r.fraction == fraction
                     and r.ok and r.init in aggs]
            if not group:
                continue
            tests = _by_init_seed(group, scores, order)
            vals = _by_init_seed(group, val_scores, order)
            calib = calibration_group(task.task, test.labels, val.labels, tests, vals, resampling,
                                      n_bins=ev.calibration_bins,
                                      per_label_temperature=ev.per_label_temperature, **boot)
            for init, entry in calib.items():
                aggs[init].calibration = Calibration(**entry)
            if ev.subgroups:
                subs = subgroup_group(task.task, test.labels, val.labels,
                                      {a: test.attributes[a] for a in ev.subgroups}, tests, vals, resampling,
                                      min_count=ev.min_subgroup_count, min_per_class=ev.min_subgroup_per_class,
                                      **boot)
                for init, entry in subs.items():
                    aggs[init].subgroups = Subgroups(**entry)
            if protocol in ev.shift_protocols(cfg.protocols) and fraction in ev.shift_fractions(cfg.label_fractions):
                for init, entry in _shift(task, rows, scores, folds, protocol, fraction, order, boot).items():
                    if init in aggs:
                        aggs[init].shift = Shift(**entry)
    return aggregates


def _by_init_seed(rows: list[CellRow], scores: dict[str, np.ndarray], order: list[str]
                  ) -> dict[str, dict[int, np.ndarray]]:
    out: dict[str, dict[int, np.ndarray]] = {}
    for r in sorted(rows, key=lambda r: (order.index(r.init), r.seed)):
        out.setdefault(r.init, {})[r.seed] = scores[r.key]
    return out


def _shift(task: TaskData, rows: list[CellRow], scores: dict[str, np.ndarray], folds: list[ShiftFold],
           protocol: str, fraction: float, order: list[str], boot: dict) -> dict[str, dict]:
    """init -> its ``shift`` entry for one (protocol, fraction) over every fold."""
    test = task.splits["test"]
    per_fold = {}
    for fold in folds:
        name = fold_name(fold)
        cells: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        for r in sorted((r for r in rows if r.fold == name and r.protocol == protocol and r.fraction == fraction
                         and r.ok), key=lambda r: (order.index(r.init), r.seed)):
            s = scores[r.key]
            cells.setdefault(r.init, {})[r.seed] = (s[fold.test_in], s[fold.test_out])
        if not cells:
            log.warning("%s: shift fold %s has no finished %s cell at fraction %g", task.name, name,
                        protocol, fraction)
            continue
        patients = test.patients
        per_fold[fold.holdout] = shift_group(
            task.task, fold, test.labels[fold.test_in], test.labels[fold.test_out],
            None if patients is None else patients[fold.test_in],
            None if patients is None else patients[fold.test_out], cells, **boot)
    return shift_entries(per_fold) if per_fold else {}
