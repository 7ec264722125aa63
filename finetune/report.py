"""Aggregates over seeds, ``report.md`` and the label-efficiency plots.

Wording rules of the report: an interval that covers 0.5 AUC is "not distinguishable from
chance"; a difference whose interval covers 0 is "no clear difference". Model selection never
sees test data: every number here is a test-split metric of a model chosen on validation.
Every aggregate and every cell line of the report states what its interval resampled (test
patients or test images, and how many) and over how many effective seeds it is a mean, since
those decide what the interval can claim (finetune/stats.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from finetune.config import FinetuneRunConfig
from finetune.inits import display_name
from finetune.stats import Resampling, Summary, bootstrap_group
from finetune.tasks import TaskData


def reference_init(inits: list[str]) -> str | None:
    """The init others are compared with: the first ssl:DIR, if any."""
    return next((i for i in inits if i.startswith("ssl:")), None)


def resampling_of(task: TaskData) -> Resampling:
    """The bootstrap's unit for a task's test split: its patients when the split records them
    (shard tasks), else its images (MedMNIST)."""
    test = task.splits["test"]
    return Resampling.of(len(test), test.patients)


def aggregate_task(task: TaskData, rows: list[dict], scores: dict[str, np.ndarray],
                   cfg: FinetuneRunConfig) -> list[dict]:
    """Aggregate rows (status ok) of one task per (protocol, fraction): mean over effective
    seeds with bootstrap CIs, and for each non-reference init the paired difference
    reference - init. Each aggregate records ``resampling`` ("patients" | "images"),
    ``n_units`` (test units resampled), ``n_seeds`` (seeds with a result) and
    ``n_effective_seeds`` (distinct results among them)."""
    labels = task.splits["test"].labels
    resampling = resampling_of(task)
    ref = reference_init(cfg.inits)
    out = []
    for protocol in cfg.protocols:
        for fraction in cfg.label_fractions:
            group = [r for r in rows if r["protocol"] == protocol and r["fraction"] == fraction
                     and r["status"] == "ok" and np.isfinite(r["auc"])]
            cells: dict[str, dict[int, np.ndarray]] = {}
            points: dict[str, dict[int, tuple[float, float]]] = {}
            for r in group:
                cells.setdefault(r["init"], {})[r["seed"]] = scores[r["key"]]
                points.setdefault(r["init"], {})[r["seed"]] = (r["auc"], r["acc"])
            if not cells:
                continue
            per_init, diffs = bootstrap_group(labels, task.task, cells, points, ref,
                                              cfg.bootstrap.n, cfg.bootstrap.confidence, seed=cfg.seed,
                                              resampling=resampling)
            for init in cfg.inits:
                if init not in per_init:
                    continue
                s = per_init[init]
                agg = {"task": task.name, "init": init, "init_label": display_name(init),
                       "protocol": protocol, "fraction": fraction,
                       "auc_mean": s["auc"].mean, "auc_ci": s["auc"].as_list(),
                       "acc_mean": s["acc"].mean, "acc_ci": s["acc"].as_list(), "n_seeds": s["n_seeds"],
                       "n_effective_seeds": s["n_effective_seeds"], "resampling": resampling.unit,
                       "n_units": resampling.n_units}
                if init in diffs:
                    d = diffs[init]
                    agg["diff_vs_ssl"] = {"reference": ref, "auc": d["auc"].mean, "auc_ci": d["auc"].as_list(),
                                          "acc": d["acc"].mean, "acc_ci": d["acc"].as_list(),
                                          "n_seeds": d["n_seeds"], "n_effective_seeds": d["n_effective_seeds"]}
                out.append(agg)
    return out


def _fmt(mean: float, ci: list[float]) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if not all(math.isfinite(v) for v in ci):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt_diff(d: dict | None, key: str) -> str:
    if not d:
        return "–"
    mean, (lo, hi) = d[key], d[f"{key}_ci"]
    if not (math.isfinite(mean) and math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    verdict = "no clear difference" if lo <= 0 <= hi else ("SSL better" if lo > 0 else "SSL worse")
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}"


def _chance(agg: dict) -> str:
    lo, hi = agg["auc_ci"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no interval"
    if lo <= 0.5 <= hi:
        return "not distinguishable from chance (CI covers 0.5)"
    return "above chance" if lo > 0.5 else "below chance"


def _seeds(n_effective: int, n_run: int) -> str:
    word = "seed" if n_effective == 1 else "seeds"
    return f"{n_effective} effective {word} of {n_run} run"


def _basis(agg: dict) -> str:
    """What a cell's interval rests on, e.g. "1 effective seed of 3 run; 24 test patients
    resampled; difference over 3 distinct seed pairs"."""
    text = (f"{_seeds(agg['n_effective_seeds'], agg['n_seeds'])}; "
            f"{agg['n_units']} test {agg['resampling']} resampled")
    d = agg.get("diff_vs_ssl")
    if d:
        pairs = "pair" if d["n_effective_seeds"] == 1 else "pairs"
        text += f"; difference over {d['n_effective_seeds']} distinct seed {pairs}"
    return text


def _resampling_sentence(info: dict | None) -> str:
    if not info:
        return ""
    if info["unit"] == "patients":
        return f"Intervals resample its {info['n_units']} test patients (all images of a patient together)."
    return (f"Intervals resample its {info['n_units']} test images: the task records no patient ids, "
            f"so images count as independent (the intervals are too narrow if a patient has several).")


def write_report(path: Path, cfg: FinetuneRunConfig, tasks: dict[str, dict], rows: list[dict],
                 aggregates: list[dict]) -> None:
    """``report.md``: per task and protocol, AUC and ACC tables (inits side by side, with
    intervals and differences to the SSL init), then one line per cell on chance level."""
    ref = reference_init(cfg.inits)
    others = [i for i in cfg.inits if i != ref]
    level = round(cfg.bootstrap.confidence * 100)
    lines = [
        "# medssl benchmark report", "",
        (f"Architecture `{cfg.model.arch}` at {cfg.input_size} px, identical recipe for every init. "
        f"Test-split metrics (AUC, ACC as defined by MedMNIST's evaluator); model selection on "
        f"validation only. Mean over effective seeds with {level}% bootstrap intervals "
        f"({cfg.bootstrap.n} replicates), each replicate resampling the test PATIENTS where a task "
        f"records them (shard tasks), else the test images (MedMNIST has no patient ids), and the "
        f"effective seeds. Seeds whose test predictions are identical (kNN and the linear probe on "
        f"ImageNet or SSL features at label fraction 1.0) count as one effective seed; random "
        f"weights are drawn anew for each seed. Differences are paired "
        f"on test units and seeds. Each task and each cell below says what was resampled."),
        "",
    ]
    skipped = [r for r in rows if r["status"] != "ok"]
    for name, info in tasks.items():
        lines += [f"## {name}", "", (f"Task type: {info['task']}; images train/val/test: "
                  f"{info['n']['train']}/{info['n']['val']}/{info['n']['test']}. "
                  f"{_resampling_sentence(info.get('resampling'))}").rstrip(), ""]
        for protocol in cfg.protocols:
            group = [a for a in aggregates if a["task"] == name and a["protocol"] == protocol]
            if not group:
                continue
            by = {(a["init"], a["fraction"]): a for a in group}
            for metric in ("auc", "acc"):
                head = ["label fraction"] + [display_name(i) for i in cfg.inits]
                if ref:
                    head += [f"Δ {display_name(ref)} − {display_name(o)}" for o in others]
                lines += [f"### {protocol}: {metric.upper()}", "",
                          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                for fraction in cfg.label_fractions:
                    cells = [f"{fraction:g}"]
                    for i in cfg.inits:
                        a = by.get((i, fraction))
                        cells.append(_fmt(a[f"{metric}_mean"], a[f"{metric}_ci"]) if a else "skipped")
                    if ref:
                        for o in others:
                            a = by.get((o, fraction))
                            cells.append(_fmt_diff(a.get("diff_vs_ssl") if a else None, metric))
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
            lines += ["Chance check (AUC interval against 0.5):", ""]
            for a in group:
                lines.append(f"- {display_name(a['init'])}, fraction {a['fraction']:g}: AUC "
                             f"{_fmt(a['auc_mean'], a['auc_ci'])}, {_chance(a)} ({_basis(a)})")
            lines.append("")
    if skipped:
        lines += ["## Skipped cells", ""]
        reasons: dict[tuple, int] = {}
        for r in skipped:
            k = (r["task"], display_name(r["init"]), r["protocol"], r.get("reason", ""))
            reasons[k] = reasons.get(k, 0) + 1
        for (task, init, protocol, reason), n in sorted(reasons.items()):
            lines.append(f"- {task} / {init} / {protocol}: {n} cells skipped: {reason}")
        lines.append("")
    path.write_text("\n".join(lines))


def plot_task(path: Path, name: str, cfg: FinetuneRunConfig, aggregates: list[dict]) -> None:
    """Label-efficiency plot: test AUC vs label fraction, one line per init with its CI band,
    one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [p for p in cfg.protocols if any(a["task"] == name and a["protocol"] == p for a in aggregates)]
    if not protocols:
        return
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.6), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        for init in cfg.inits:
            pts = sorted((a["fraction"], a["auc_mean"], *a["auc_ci"]) for a in aggregates
                         if a["task"] == name and a["protocol"] == protocol and a["init"] == init)
            if not pts:
                continue
            x, m, lo, hi = (np.array(v, dtype=float) for v in zip(*pts))
            ax.plot(x, m, marker="o", label=display_name(init))
            ax.fill_between(x, lo, hi, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("label fraction of train split")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{name}: {protocol}")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summaries_to_json(value: object) -> object:
    """Replace Summary objects and NaN by JSON-safe values (NaN -> None)."""
    if isinstance(value, Summary):
        return {"mean": value.mean, "ci": value.as_list()}
    if isinstance(value, dict):
        return {k: summaries_to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [summaries_to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return summaries_to_json(value.item())
    return value
