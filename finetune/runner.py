"""``medssl finetune CONFIG.yaml [key=value ...]``: run the benchmark grid, resumably.

For each task: load it once, draw the label-fraction subsets once (shared by every init and
protocol, so comparisons are paired), then for each init build the backbone once, cache its
frozen features, and run the unfinished (seed, protocol, fraction) cells, and with
``evaluation.shift`` the same cells once per site-shift fold (trained and selected without the
held-out site; finetune/protocols.py runs one cell). Finished cells are read back from
``cells.jsonl``; results.json (with calibration, subgroups and shift per aggregate:
finetune/evaluation.py), report.md and the plots are rebuilt from all cells at the end of
every run.

Every seed-dependent choice comes from the cell's seed: the label subset, the probe's and the
fine-tuning's randomness, and the random-init weights themselves. Random weights are thus one
draw per seed (frozen features cached per (task, seed)), so "random" intervals carry the
variation between random networks; ImageNet and SSL features do not depend on the seed and are
cached once per (task, init).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from finetune.aggregate import aggregate_task, resampling_of
from finetune.cells import CellSpec, CellStore, cell_key
from finetune.config import FinetuneRunConfig, TaskConfig
from finetune.evaluation import (
    check_evaluation,
    clinical_aggregates,
    fold_name,
    folds_of,
    needed_attributes,
)
from finetune.explanations import check_config as check_explain
from finetune.explanations import explain_task
from finetune.fractions import draw_subset
from finetune.inits import fingerprint, load_init
from finetune.inits3d import VolumeSuite, check_volume_inits, load_volume_init, volume_suite
from finetune.leakage_guard import SuiteGuard
from finetune.leakage_guard import preflight as leakage_preflight
from finetune.metrics import evaluate
from finetune.plots import plot_task
from finetune.plots_clinical import plot_task_clinical
from finetune.preprocess import Preprocessor
from finetune.preprocess3d import VolumePreprocessor
from finetune.protocols import RANDOM_PER_SEED, FrozenFeatures, run_protocol, seed_free
from finetune.report import write_report
from finetune.shift import ShiftFold
from finetune.tasks import SPLITS, TaskData, load_task
from finetune.tracking import Tracker
from medssl.config import git_sha, load_config, save_config, to_dict
from medssl.errors import MedsslError
from medssl.init import Init
from medssl.results import CellRow, Results
from medssl.volume_models import is_volume_arch

log = logging.getLogger(__name__)


def finetune_command(config_path: Path, overrides: list[str]) -> int:
    """Validate the config, run every unfinished cell, write results; returns the exit code."""
    cfg = load_config(FinetuneRunConfig, config_path, overrides)
    guard = _preflight(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    results = run_suite(cfg, guard)
    n_ok = sum(r.status == "ok" for r in results.rows)
    n_skip = len(results.rows) - n_ok
    print(f"finetune: {n_ok} cells ok, {n_skip} skipped; report: {out / 'report.md'}")
    return 0


def _preflight(cfg: FinetuneRunConfig) -> SuiteGuard:
    """Fail before any work on what the user can fix: missing data or weights folders,
    subgroup or shift analyses of tasks that record no attributes (MedMNIST), and held-out data
    an ssl init was pretrained on (finetune/leakage_guard.py)."""
    needed = needed_attributes(cfg.evaluation)
    for task in cfg.tasks:
        if task.kind == "medmnist" and needed:
            raise MedsslError(f"tasks: {task.name}: evaluation needs per-image {', '.join(needed)}, and "
                              "MedMNIST records no attributes; drop evaluation.subgroups / evaluation.shift "
                              "or benchmark a shards task that records them")
        if task.kind == "medmnist":
            suffix = "" if task.size == 28 else f"_{task.size}"
            npz = Path(task.root) / f"{task.flag}{suffix}.npz"
            if not npz.is_file():
                import medmnist

                url = medmnist.INFO[task.flag]["url" + suffix].split("?")[0]
                raise MedsslError(f"tasks: {task.name}: {npz} not found; download it from {url} into {task.root}")
        elif not (Path(task.path) / "index.json").is_file():
            raise MedsslError(f"tasks: {task.name}: {Path(task.path) / 'index.json'} not found; "
                              "point path at a folder written by `medssl shard --recipe ...`")
    for init in cfg.init_list:
        fingerprint(init, cfg.imagenet_weights)  # raises for a missing published dir or file
    check_volume_inits(cfg)   # 3-D weights in a 3-D suite only, and the reverse
    if cfg.imagenet_weights and not Path(cfg.imagenet_weights).is_file():
        raise MedsslError(f"imagenet_weights: {cfg.imagenet_weights} not found")
    check_explain(cfg)
    return leakage_preflight(cfg)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_suite(cfg: FinetuneRunConfig, guard: SuiteGuard | None = None) -> Results:
    """Run the grid; write results.json, report.md and plots; return the results record."""
    guard = guard if guard is not None else leakage_preflight(cfg)
    out = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    store = CellStore(out)
    tracker = Tracker(cfg, out)
    rows: list[CellRow] = []
    aggregates = []
    tasks_info: dict[str, dict] = {}
    suite = volume_suite(cfg) if is_volume_arch(cfg.model.arch) else None
    try:
        for task_cfg in cfg.tasks:
            task = load_task(task_cfg, side=suite.max_side if suite else cfg.input_size)
            if (task.spatial_dims == 3) != (suite is not None):
                raise MedsslError(f"tasks: {task.name}: {task.spatial_dims}-D data and model.arch "
                                  f"{cfg.model.arch} ({'3' if suite else '2'}-D); benchmark volumes "
                                  "with a monai:<Net> arch and images with a timm one")
            # Before any of the task's cells: the attributes the evaluation needs, the folds.
            check_evaluation(task, cfg.evaluation, task_cfg.path or task_cfg.root)
            folds = folds_of(task, cfg.evaluation)
            unit = resampling_of(task)
            tasks_info[task.name] = {"task": task.task, "n": {s: len(task.splits[s]) for s in SPLITS},
                                     "resampling": {"unit": unit.unit, "n_units": unit.n_units}}
            if suite is not None:
                tasks_info[task.name]["spatial_dims"] = 3
            task_rows = guard.mark(task.name, _run_task(cfg, task_cfg, task, store, tracker, device, folds,
                                                        suite))
            tasks_info[task.name]["leakage"] = guard.task_record(task_cfg, out)
            if cfg.evaluation.explain is not None:
                tasks_info[task.name]["explanations"] = explain_task(
                    cfg, cfg.evaluation.explain, task_cfg, task, task_rows, store, device, out)
            ok = [r for r in task_rows if r.status == "ok"]
            scores = {r.key: store.scores(r.key) for r in ok}
            val_scores = {r.key: store.val_scores(r.key) for r in ok}
            task_aggs = aggregate_task(task, [r for r in task_rows if r.fold is None], scores, cfg)
            task_aggs = clinical_aggregates(task, task_aggs, task_rows, scores, val_scores, cfg, folds)
            plot_task(out / "plots" / f"{task.name}.png", task.name, cfg, task_aggs)
            plot_task_clinical(out / "plots", task.name, cfg, task_aggs)
            rows += task_rows
            aggregates += task_aggs
        results = Results(git_sha=git_sha(), config=to_dict(cfg), tasks=tasks_info, rows=rows,
                          aggregates=aggregates)
        results.write(out / "results.json")
        write_report(out / "report.md", cfg, tasks_info, rows, aggregates)
        tracker.finish(rows, aggregates)
    finally:
        tracker.close()
    return results


def _run_task(cfg: FinetuneRunConfig, task_cfg: TaskConfig, task: TaskData, store: CellStore,
              tracker: Tracker, device: torch.device, folds: list[ShiftFold],
              suite: VolumeSuite | None = None) -> list[CellRow]:
    train = task.splits["train"]
    labels = {s: task.splits[s].labels for s in SPLITS}
    subsets = {(f, s): draw_subset(train.labels, f, s, train.patients, task.multilabel)
               for f in cfg.label_fractions for s in cfg.seeds}
    # A fold draws its label fraction from the other sites' train images only.
    fold_of = {fold_name(f): f for f in folds}
    for name, fold in fold_of.items():
        pats = None if train.patients is None else train.patients[fold.train]
        for f in cfg.evaluation.shift_fractions(cfg.label_fractions):
            for s in cfg.seeds:
                subsets[(f, s, name)] = fold.train[draw_subset(train.labels[fold.train], f, s, pats,
                                                               task.multilabel)]
    shift_protocols = cfg.evaluation.shift_protocols(cfg.protocols)
    shift_fractions = cfg.evaluation.shift_fractions(cfg.label_fractions)
    common = {"task": task.fingerprint, "arch": cfg.model.arch, "in_chans": cfg.model.in_chans,
              "input_size": cfg.input_size, "interpolation": cfg.interpolation}
    if suite is not None:   # 3-D only, so 2-D keys (and their finished cells) stay as they were
        common["volume"] = {"kwargs": suite.kwargs, "cube": list(suite.cube)}
    protocol_cfg = {"knn": to_dict(cfg.knn), "linear": to_dict(cfg.linear), "finetune": to_dict(cfg.finetune)}
    rows: list[CellRow] = []
    for init in cfg.init_list:
        fp = fingerprint(init, cfg.imagenet_weights)
        cells: list[CellSpec] = []
        # Seed outermost: with random weights each seed has its own features, loaded once.
        for seed in cfg.seeds:
            for protocol in cfg.protocols:
                for fraction in cfg.label_fractions:
                    parts = dict(**common, init=_cell_init(fp, init, protocol, cfg.seed), protocol=protocol,
                                 settings=protocol_cfg[protocol], fraction=fraction, seed=seed)
                    cells.append(CellSpec(protocol, fraction, seed, cell_key(**parts)))
                    if protocol in shift_protocols and fraction in shift_fractions:
                        # In-distribution keys stay as they were; a fold adds its own part.
                        cells += [CellSpec(protocol, fraction, seed, cell_key(**parts, shift=name), fold=name)
                                  for name in fold_of]
        todo = [c for c in cells if c.key not in store]
        # A reused cell takes this run's names: a renamed task or a moved ssl dir with the same
        # SHA256SUMS is the same cell.
        rows += [dataclasses.replace(store.rows[c.key], task=task.name, init=str(init), init_label=init.label)
                 for c in cells if c.key in store]
        if not todo:
            continue
        log.info("%s / %s: %d cells to run, %d already finished", task.name, init.label,
                 len(todo), len(cells) - len(todo))
        try:
            source = (load_volume_init(init, suite, task.channels, cfg.model.in_chans) if suite else
                      load_init(init, cfg.model.arch, task.channels, cfg.model.in_chans, cfg.imagenet_weights))
        except MedsslError as exc:
            from medssl.models import WeightsUnavailable

            if not isinstance(exc, WeightsUnavailable):
                raise
            log.warning("%s: skipping %s: %s", task.name, init, exc)
            rows += [_row(task, init, c, len(_subset(subsets, c)), status="skipped", reason=str(exc))
                     for c in todo]
            continue
        prep = VolumePreprocessor(source) if suite else Preprocessor(source, cfg.input_size, cfg.interpolation)
        features = FrozenFeatures(cfg, task, init, fp, common, source.make, prep, device)
        seedless: dict[tuple, dict] = {}   # results that cannot depend on the seed, computed once
        for cell in tqdm(todo, desc=f"{task.name}/{init.label}", leave=False):
            idx = _subset(subsets, cell)
            fold = fold_of.get(cell.fold)
            t0 = time.perf_counter()
            memo = (cell.protocol, cell.fraction, cell.fold) if seed_free(init, cell.protocol, cell.fraction) else None
            result = seedless.get(memo) if memo else None
            if result is None:
                result = run_protocol(cell.protocol, cfg, task, idx, None if fold is None else fold.val,
                                      cell.seed, features, source.make, prep, device)
                if memo:
                    seedless[memo] = result
            if "error" in result:
                rows.append(_row(task, init, cell, len(idx), status="skipped", reason=result["error"]))
                continue
            # A fold cell's own figures are those of the held-out test images.
            scored = slice(None) if fold is None else fold.test_out
            auc, acc = evaluate(labels["test"][scored], result["test_scores"][scored], task.task)
            row = _row(task, init, cell, len(idx), status="ok", auc=auc, acc=acc,
                       val_auc=result["val_auc"], chosen=result["chosen"],
                       seconds=round(time.perf_counter() - t0, 3))
            store.add(row, result["test_scores"], result["val_scores"])
            tracker.log_row(row)
            rows.append(row)
    return rows


def _subset(subsets: dict[tuple, np.ndarray], cell: CellSpec) -> np.ndarray:
    """The train indices of a cell: its (fraction, seed) subset, or its fold's."""
    return subsets[(cell.fraction, cell.seed) if cell.fold is None else (cell.fraction, cell.seed, cell.fold)]


def _cell_init(fp: str, init: Init, protocol: str, run_seed: int) -> str:
    """The init part of a cell key. Random frozen features: RANDOM_PER_SEED. Random full
    fine-tuning always drew its weights from the cell's seed (run_finetune seeds torch first), so
    its key keeps its old form and finished fine-tuning cells, the costly ones, stay valid."""
    if init.kind != "random":
        return fp
    return f"random:seed{run_seed}" if protocol == "finetune" else RANDOM_PER_SEED


def _row(task: TaskData, init: Init, cell: CellSpec, n_train: int, status: str, reason: str = "",
         **metrics: object) -> CellRow:
    return CellRow(task=task.name, init=str(init), init_label=init.label, protocol=cell.protocol,
                   fraction=cell.fraction, seed=cell.seed, n_train=int(n_train), status=status,
                   key=cell.key, reason=reason, fold=cell.fold, **metrics)
