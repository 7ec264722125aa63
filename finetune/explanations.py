"""Explanations of benchmarked models: ``evaluation.explain`` in finetune, and ``medssl explain``.

For each task and init, the model of ONE benchmark cell (the explained protocol at one label
fraction and seed; by default the largest fraction and the first seed) is rebuilt exactly:

- linear: the same backbone (random weights drawn from the cell's seed, as the runner draws
  them), the probe refitted with ``finetune.explain.fit_probe`` at the C the cell chose on
  validation, on the same label subset; the data-randomisation reference refits it on
  permuted labels (cheap: one more fit).
- finetune: the cell is trained again with its seed, keeping the best validation epoch's
  weights (``run_finetune(keep_best=True)``); one more fine-tuning run per (task, init), and
  a second one for the data-randomisation reference only when asked for.

Each record says whether the rebuilt model reproduces the cell's stored test scores
(``reproduces.max_abs_diff``), so a map set is known to explain the model that was scored.
Then ``finetune.explain.explain_set`` draws the maps on ``n_per_class`` test images per
class, runs the sanity checks and, with masks, the localisation score. Records and PNGs go to
``<output_dir>/explain/<task>/``; a finished record is read back on re-runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.cells import CellStore
from finetune.config import FinetuneRunConfig, TaskConfig
from finetune.explain_config import ExplainConfig
from finetune.tasks import TaskData
from medssl.errors import ConfigError, MedsslError
from medssl.init import Init
from medssl.io import atomic_write_json, sha256_file
from medssl.results import CellRow, json_safe

log = logging.getLogger(__name__)

EXPLAIN_DIR = "explain"


def check_config(cfg: FinetuneRunConfig) -> None:
    """What only the whole config can tell: the explained cell exists, the method fits the arch."""
    ecfg = cfg.evaluation.explain
    if ecfg is None:
        return
    if ecfg.protocol not in cfg.protocols:
        raise ConfigError(f"evaluation.explain.protocol {ecfg.protocol!r} is not among protocols "
                          f"{cfg.protocols}: the explained model must be a benchmarked one")
    if ecfg.fraction is not None and ecfg.fraction not in cfg.label_fractions:
        raise ConfigError(f"evaluation.explain.fraction {ecfg.fraction} is not among "
                          f"label_fractions {cfg.label_fractions}")
    if ecfg.seed is not None and ecfg.seed not in cfg.seeds:
        raise ConfigError(f"evaluation.explain.seed {ecfg.seed} is not among seeds {cfg.seeds}")
    if ecfg.masks is not None:
        if not Path(ecfg.masks).is_file():
            raise ConfigError(f"evaluation.explain.masks: {ecfg.masks} not found")
        if any(t.kind != "shards" for t in cfg.tasks):
            raise ConfigError("evaluation.explain.masks: masks are joined by shard sample key; "
                              "every task must then be a shards task")
    if ecfg.method == "rollout" and not _is_vit(cfg.model.arch):
        raise ConfigError(f"evaluation.explain.method rollout needs a ViT (attention); "
                          f"{cfg.model.arch} has none: use gradcam")


def _is_vit(arch: str) -> bool:
    import timm

    from finetune.explain import vit_of

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return vit_of(model) is not None


def explained_cell(cfg: FinetuneRunConfig, ecfg: ExplainConfig) -> tuple[float, int]:
    """(label fraction, seed) of the explained cell."""
    fraction = ecfg.fraction if ecfg.fraction is not None else max(cfg.label_fractions)
    return fraction, ecfg.seed if ecfg.seed is not None else cfg.seeds[0]


def class_names(task_cfg: TaskConfig, task: TaskData) -> list[str]:
    """Display names of the task's classes: index.json's labels.names, medmnist's INFO."""
    names: list[str] = []
    if task_cfg.kind == "shards":
        from medssl.data.shards import read_index

        names = list((read_index(task_cfg.path).get("labels") or {}).get("names") or [])
    else:
        import medmnist

        label = medmnist.INFO[task_cfg.flag]["label"]
        names = [label[str(i)] for i in range(len(label))]
    return [names[i] if i < len(names) else str(i) for i in range(task.n_classes)]


def split_keys(path: str, split: str) -> list[str]:
    """Sample keys of one split, in the order ``finetune.tasks.load_task`` reads its samples."""
    from medssl.data.shards import iter_samples, list_shards

    return [s.key for s in iter_samples(list_shards(str(path), split))]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def explain_task(cfg: FinetuneRunConfig, ecfg: ExplainConfig, task_cfg: TaskConfig,
                 task: TaskData, rows: list[CellRow], store: CellStore, device: torch.device,
                 out_dir: Path, inits: list[Init] | None = None) -> dict[str, Any]:
    """Map sets for every init of one task: results.json ``tasks.<name>.explanations``."""
    from finetune.explain.grid import pick_per_class

    fraction, seed = explained_cell(cfg, ecfg)
    settings = {"protocol": ecfg.protocol, "method": ecfg.method, "targets": ecfg.targets,
                "n_per_class": ecfg.n_per_class, "fraction": fraction, "seed": seed}
    entry: dict[str, Any] = {"settings": settings, "maps": []}
    if task.multilabel:
        entry["status"] = "skipped: maps are drawn per class, for single-label tasks only"
        return entry
    test = task.splits["test"]
    pick = pick_per_class(test.labels, ecfg.n_per_class, seed)
    masks, mask_digest, missing = None, None, 0
    if ecfg.masks:
        from finetune.explain_masks import load_masks

        source = load_masks(ecfg.masks)
        keys = split_keys(task_cfg.path, "test")
        if len(keys) != len(test):
            raise MedsslError(f"tasks: {task.name}: {len(keys)} test keys read for {len(test)} "
                              "test images; the shards changed while the benchmark ran")
        masks, missing = source.for_keys([keys[i] for i in pick], (cfg.input_size, cfg.input_size))
        mask_digest = sha256_file(ecfg.masks)
    names = class_names(task_cfg, task)
    folder = Path(out_dir) / EXPLAIN_DIR / task.name
    by_cell = {(r.init, r.protocol, r.fraction, r.seed): r for r in rows if r.ok and r.fold is None}
    for init in inits or cfg.init_list:
        row = by_cell.get((str(init), ecfg.protocol, fraction, seed))
        base = {"init": str(init), "init_label": init.label, **settings}
        if row is None:
            entry["maps"].append({**base, "status": "skipped", "reason": (
                f"no finished {ecfg.protocol} cell at fraction {fraction:g}, seed {seed}")})
            continue
        ident = hashlib.sha256(json.dumps([row.key, settings, ecfg.data_randomisation,
                                           mask_digest, pick.tolist()]).encode()).hexdigest()[:12]
        stem = f"{_slug(init.label)}-{ecfg.protocol}-{ecfg.method}-{ident}"
        record_path = folder / f"{stem}.json"
        if record_path.is_file() and (folder / f"{stem}.png").is_file():
            entry["maps"].append(json.loads(record_path.read_text()))
            continue
        log.info("explaining %s / %s (%s, fraction %g, seed %d)", task.name, init.label,
                 ecfg.protocol, fraction, seed)
        record = _explain_one(cfg, ecfg, task, init, row, store, device, pick, masks, names,
                              folder / f"{stem}.png", seed, fraction)
        record = json_safe({**base, "status": "ok", "cell": row.key, **record,
                            "grid": f"{EXPLAIN_DIR}/{task.name}/{stem}.png"})
        if masks is not None:
            record.setdefault("localisation", {})["images_without_mask_entry"] = int(missing)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record_path, record)
        entry["maps"].append(record)
    return entry


def _explain_one(cfg: FinetuneRunConfig, ecfg: ExplainConfig, task: TaskData, init: Init,
                 row: CellRow, store: CellStore, device: torch.device, pick: np.ndarray,
                 masks: np.ndarray | None, names: list[str], png: Path, seed: int,
                 fraction: float) -> dict[str, Any]:
    from finetune.explain import explain_set
    from finetune.explain.grid import display_images
    from finetune.explain.run import predict
    from finetune.inits import load_init
    from finetune.preprocess import Preprocessor

    source = load_init(init, cfg.model.arch, task.channels, cfg.model.in_chans, cfg.imagenet_weights)
    prep = Preprocessor(source, cfg.input_size, cfg.interpolation)
    build = _linear if ecfg.protocol == "linear" else _finetuned
    cheap = ecfg.protocol == "linear"
    want_data = ecfg.data_randomisation if ecfg.data_randomisation is not None else cheap
    model, permuted_model, stored_like = build(cfg, task, init, row, source, prep, device, seed,
                                               fraction, want_data)
    test = task.splits["test"]
    images = prep(test, pick).to(device)
    display = display_images(images.cpu(), source.mean, source.std)
    title = f"{task.name} / {init.label} / {ecfg.protocol} (fraction {fraction:g}, seed {seed})"
    record = explain_set(model, images, test.labels[pick], names, display, png, title,
                         method=ecfg.method, targets=ecfg.targets, permuted_model=permuted_model,
                         masks=masks, seed=seed, multilabel=task.multilabel)
    stored = store.scores(row.key)
    mine = predict(model, images) if stored_like is None else stored_like
    rows_compared = stored[pick] if stored_like is None else stored
    record["reproduces"] = {"max_abs_diff": float(np.abs(mine - rows_compared).max()),
                            "compared": "explained images" if stored_like is None else "test split",
                            "test_auc_of_cell": row.auc}
    if not want_data:
        record["data_randomisation"] = {"status": "not run" + (
            ": costs one more fine-tuning run; set evaluation.explain.data_randomisation: true"
            if not cheap else "")}
    return record


def _seeded(make, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make()


def _linear(cfg, task, init, row, source, prep, device, seed, fraction, want_data):
    """Backbone as the runner drew it, probe refitted at the cell's C on the cell's subset."""
    from threadpoolctl import threadpool_limits

    from finetune.explain import ProbeClassifier, fit_probe, permuted, probe_head
    from finetune.fractions import draw_subset

    train = task.splits["train"]
    idx = draw_subset(train.labels, fraction, seed, train.patients, task.multilabel)
    backbone = _seeded(source.make, seed if init.kind == "random" else cfg.seed).to(device).eval()
    with torch.no_grad():
        feats = np.concatenate([
            backbone(prep(train, idx[s:s + cfg.feature_batch_size]).to(device)).float().cpu().numpy()
            for s in range(0, len(idx), cfg.feature_batch_size)]).astype(np.float32)
    labels = train.labels[idx]
    C = float(row.chosen["C"])
    with threadpool_limits(limits=1, user_api="blas"):   # as finetune/linear.py fits it
        scaler, clf = fit_probe(feats, labels, C, cfg.linear.max_iter, seed, task.multilabel)
        model = ProbeClassifier(backbone, probe_head(scaler, clf, task.n_classes)).to(device).eval()
        shuffled = None
        if want_data:
            ps, pc = fit_probe(feats, permuted(labels, seed), C, cfg.linear.max_iter, seed,
                               task.multilabel)
            shuffled = ProbeClassifier(backbone, probe_head(ps, pc, task.n_classes)).to(device).eval()
    return model, shuffled, None


def _finetuned(cfg, task, init, row, source, prep, device, seed, fraction, want_data):
    """The cell trained again with its seed, keeping its best validation epoch."""
    from finetune.explain.probe import permuted
    from finetune.fractions import draw_subset
    from finetune.full import Classifier, run_finetune

    train = task.splits["train"]
    idx = draw_subset(train.labels, fraction, seed, train.patients, task.multilabel)

    def trained(on: TaskData) -> tuple[torch.nn.Module, np.ndarray]:
        result = run_finetune(source.make, on, idx, prep, cfg.finetune, device, seed,
                              cfg.feature_batch_size, keep_best=True)
        if "error" in result:
            raise MedsslError(f"tasks: {task.name}: explaining {init.label}: {result['error']}")
        model = Classifier(source.make(), task.n_classes)
        model.load_state_dict(result["best_state"])
        return model.to(device).eval(), result["test_scores"]

    model, scores = trained(task)
    shuffled = None
    if want_data:
        swapped = dataclasses.replace(train, labels=permuted(train.labels, seed))
        shuffled, _ = trained(dataclasses.replace(task, splits={**task.splits, "train": swapped}))
    return model, shuffled, scores


# --- report and command ---------------------------------------------------------------------


def _score(d: dict | None) -> str:
    if not d or d.get("score") is None:
        return "n/a"
    lo, hi = d.get("ci") or (None, None)
    return f"{d['score']:.2f} [{lo:.2f}, {hi:.2f}]" if lo is not None else f"{d['score']:.2f}"


def report_lines(info: dict[str, Any]) -> list[str]:
    """report.md lines for one task's ``explanations`` record (empty when there is none)."""
    entry = info.get("explanations")
    if not entry:
        return []
    s = entry["settings"]
    lines = ["### Explanations", "",
             (f"{s['method']} maps of the {s['protocol']} model (label fraction {s['fraction']:g}, "
              f"seed {s['seed']}) on up to {s['n_per_class']} test images per class, explaining the "
              f"{'predicted' if s['targets'] == 'pred' else 'true'} class. Sanity checks after "
              "Adebayo et al. (2018): a map set that still resembles the trained model's maps "
              "after its weights are re-initialised (Spearman above 0.5) shows the image or the "
              "architecture, not what the model learned."), ""]
    if entry.get("status"):
        return lines + [f"Not drawn: {entry['status']}.", ""]
    for m in entry["maps"]:
        if m.get("status") != "ok":
            lines.append(f"- {m['init_label']}: not drawn ({m.get('reason', m.get('status'))}).")
            continue
        v = m["verdict"]
        lines.append(f"- **{m['init_label']}**: [grid]({m['grid']}): **{v['words']}**.")
        lines += [f"  - {t}." for t in v["tests"]]
        flat = (m.get("model_randomisation", {}).get("final") or {}).get("flat")
        if flat:
            lines.append(f"  - {flat} of {m['n_images']} images have a flat map (no positive "
                         "evidence at the hooked layer) before or after re-initialisation; a flat "
                         "map has no ranking and counts as Spearman 0.")
        if m.get("data_randomisation", {}).get("status"):
            lines.append(f"  - Data randomisation {m['data_randomisation']['status']}.")
        loc = m.get("localisation")
        if loc and loc.get("n_scored"):
            tr, rd = loc["trained"], loc["randomised"]
            lines.append(
                f"  - Localisation on {loc['n_scored']} explained images with a known finding "
                f"(maps of the true class): pointing game {_score(tr['pointing_game'])} "
                f"(re-initialised model {_score(rd['pointing_game'])}); energy inside the "
                f"finding {_score(tr['energy_inside'])} (re-initialised "
                f"{_score(rd['energy_inside'])}; the findings cover "
                f"{100 * tr['energy_inside']['chance']:.0f}% of the image).")
        elif loc:
            lines.append("  - Localisation: no explained image has a finding mask.")
        r = m.get("reproduces") or {}
        if r.get("max_abs_diff") is not None and r["max_abs_diff"] > 1e-3:
            lines.append(f"  - The rebuilt model's test probabilities differ from the benchmarked "
                         f"cell's by up to {r['max_abs_diff']:.3f}: the maps explain a near copy.")
    lines.append("")
    return lines
