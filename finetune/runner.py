"""``medssl finetune CONFIG.yaml [key=value ...]``: run the benchmark grid, resumably.

For each task: load it once, draw the label-fraction subsets once (shared by every init and
protocol, so comparisons are paired), then for each init build the backbone once, cache its
frozen features, and run the unfinished (seed, protocol, fraction) cells. Finished cells are
read back from ``cells.jsonl``; results.json, report.md and the plots are rebuilt from all
cells at the end of every run.

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
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from finetune.cells import CellSpec, CellStore, cell_key
from finetune.config import FinetuneRunConfig, TaskConfig
from finetune.explanations import check_config as check_explain
from finetune.explanations import explain_task
from finetune.features import cached_features
from finetune.fractions import draw_subset
from finetune.full import run_finetune
from finetune.inits import fingerprint, load_init
from finetune.knn import run_knn
from finetune.leakage_guard import SuiteGuard
from finetune.leakage_guard import preflight as leakage_preflight
from finetune.linear import run_linear
from finetune.metrics import evaluate
from finetune.preprocess import Preprocessor
from finetune.aggregate import aggregate_task, resampling_of
from finetune.plots import plot_task
from finetune.report import write_report
from finetune.tasks import SPLITS, TaskData, load_task
from finetune.tracking import Tracker
from medssl.config import git_sha, load_config, save_config, to_dict
from medssl.errors import MedsslError
from medssl.init import Init
from medssl.results import CellRow, Results

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
    """Fail before any work on what the user can fix: missing data or weights folders, and
    held-out data an ssl init was pretrained on (finetune/leakage_guard.py)."""
    for task in cfg.tasks:
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
        fingerprint(init, cfg.imagenet_weights)  # raises for a missing published dir
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
    try:
        for task_cfg in cfg.tasks:
            task = load_task(task_cfg, side=cfg.input_size)
            unit = resampling_of(task)
            tasks_info[task.name] = {"task": task.task, "n": {s: len(task.splits[s]) for s in SPLITS},
                                     "resampling": {"unit": unit.unit, "n_units": unit.n_units}}
            task_rows = guard.mark(task.name, _run_task(cfg, task_cfg, task, store, tracker, device))
            tasks_info[task.name]["leakage"] = guard.task_record(task_cfg, out)
            if cfg.evaluation.explain is not None:
                tasks_info[task.name]["explanations"] = explain_task(
                    cfg, cfg.evaluation.explain, task_cfg, task, task_rows, store, device, out)
            scores = {r.key: store.scores(r.key) for r in task_rows if r.status == "ok"}
            task_aggs = aggregate_task(task, task_rows, scores, cfg)
            plot_task(out / "plots" / f"{task.name}.png", task.name, cfg, task_aggs)
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
              tracker: Tracker, device: torch.device) -> list[CellRow]:
    train = task.splits["train"]
    labels = {s: task.splits[s].labels for s in SPLITS}
    subsets = {(f, s): draw_subset(train.labels, f, s, train.patients, task.multilabel)
               for f in cfg.label_fractions for s in cfg.seeds}
    common = {"task": task.fingerprint, "arch": cfg.model.arch, "in_chans": cfg.model.in_chans,
              "input_size": cfg.input_size, "interpolation": cfg.interpolation}
    protocol_cfg = {"knn": to_dict(cfg.knn), "linear": to_dict(cfg.linear), "finetune": to_dict(cfg.finetune)}
    rows: list[CellRow] = []
    for init in cfg.init_list:
        fp = fingerprint(init, cfg.imagenet_weights)
        cells: list[CellSpec] = []
        # Seed outermost: with random weights each seed has its own features, loaded once.
        for seed in cfg.seeds:
            for protocol in cfg.protocols:
                for fraction in cfg.label_fractions:
                    key = cell_key(**common, init=_cell_init(fp, init, protocol, cfg.seed),
                                   protocol=protocol, settings=protocol_cfg[protocol],
                                   fraction=fraction, seed=seed)
                    cells.append(CellSpec(protocol, fraction, seed, key))
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
            source = load_init(init, cfg.model.arch, task.channels, cfg.model.in_chans, cfg.imagenet_weights)
        except MedsslError as exc:
            from medssl.models import WeightsUnavailable

            if not isinstance(exc, WeightsUnavailable):
                raise
            log.warning("%s: skipping %s: %s", task.name, init, exc)
            rows += [_row(task, init, c, len(subsets[(c.fraction, c.seed)]), status="skipped", reason=str(exc))
                     for c in todo]
            continue
        prep = Preprocessor(source, cfg.input_size, cfg.interpolation)
        loaded: tuple[str, dict[str, np.ndarray]] | None = None  # one feature set in memory at a time
        for cell in tqdm(todo, desc=f"{task.name}/{init.label}", leave=False):
            protocol, seed = cell.protocol, cell.seed
            idx = subsets[(cell.fraction, seed)]
            t0 = time.perf_counter()
            if protocol in ("knn", "linear"):
                random = init.kind == "random"
                weights_seed = seed if random else cfg.seed
                feat_key = (cell_key(**common, init=RANDOM_PER_SEED, seed=seed) if random
                            else cell_key(**common, init=fp))
                if loaded is None or loaded[0] != feat_key:
                    path = Path(cfg.output_dir) / "features" / f"{task.name}-{feat_key}.npz"
                    loaded = (feat_key, cached_features(path, partial(_seeded, source.make, weights_seed),
                                                        task, prep, device, cfg.feature_batch_size))
                feats = loaded[1]
            if protocol == "knn":
                result = run_knn(feats, labels, idx, task.task, task.n_classes, cfg.knn.k, cfg.knn.temperature)
            elif protocol == "linear":
                result = run_linear(feats, labels, idx, task.task, task.n_classes, cfg.linear.Cs,
                                    cfg.linear.max_iter, seed)
            else:
                result = run_finetune(source.make, task, idx, prep, cfg.finetune, device, seed,
                                      cfg.feature_batch_size)
            if "error" in result:
                rows.append(_row(task, init, cell, len(idx), status="skipped", reason=result["error"]))
                continue
            auc, acc = evaluate(labels["test"], result["test_scores"], task.task)
            row = _row(task, init, cell, len(idx), status="ok", auc=auc, acc=acc,
                       val_auc=result["val_auc"], chosen=result["chosen"],
                       seconds=round(time.perf_counter() - t0, 3))
            store.add(row, result["test_scores"])
            tracker.log_row(row)
            rows.append(row)
    return rows


#: Cell and feature-cache identity of random weights drawn from each cell's own seed. Cells of
#: the earlier meaning (``random:seed<run seed>``: one random network shared by every seed) get
#: other keys, so they are never reused as if they carried seed variation.
RANDOM_PER_SEED = "random:weights-from-cell-seed"


def _cell_init(fp: str, init: Init, protocol: str, run_seed: int) -> str:
    """The init part of a cell key. Random frozen features: RANDOM_PER_SEED. Random full
    fine-tuning always drew its weights from the cell's seed (run_finetune seeds torch first), so
    its key keeps its old form and finished fine-tuning cells, the costly ones, stay valid."""
    if init.kind != "random":
        return fp
    return f"random:seed{run_seed}" if protocol == "finetune" else RANDOM_PER_SEED


def _seeded(make: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make()


def _row(task: TaskData, init: Init, cell: CellSpec, n_train: int, status: str, reason: str = "",
         **metrics: object) -> CellRow:
    return CellRow(task=task.name, init=str(init), init_label=init.label, protocol=cell.protocol,
                   fraction=cell.fraction, seed=cell.seed, n_train=int(n_train), status=status,
                   key=cell.key, reason=reason, **metrics)
