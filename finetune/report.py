"""``report.md``: the benchmark's tables, chance checks and skipped cells, in plain words.

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

from finetune.config import FinetuneRunConfig
from finetune.explanations import report_lines as explanation_lines
from finetune.leakage_guard import report_lines as leakage_lines
from finetune.report3d import volume_header
from finetune.report_clinical import clinical_sections
from medssl.init import reference
from medssl.results import Aggregate, CellRow, Difference


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _fmt(mean: float | None, ci: list[float | None]) -> str:
    if not _finite(mean):
        return "n/a"
    if not _finite(*ci):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt_diff(d: Difference | None, key: str) -> str:
    if not d:
        return "–"
    mean, (lo, hi) = getattr(d, key), getattr(d, f"{key}_ci")
    if not _finite(mean, lo, hi):
        return "n/a"
    verdict = "no clear difference" if lo <= 0 <= hi else ("SSL better" if lo > 0 else "SSL worse")
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}"


def _chance(agg: Aggregate) -> str:
    lo, hi = agg.auc_ci
    if not _finite(lo, hi):
        return "no interval"
    if lo <= 0.5 <= hi:
        return "not distinguishable from chance (CI covers 0.5)"
    return "above chance" if lo > 0.5 else "below chance"


def _seeds(n_effective: int, n_run: int) -> str:
    word = "seed" if n_effective == 1 else "seeds"
    return f"{n_effective} effective {word} of {n_run} run"


def _basis(agg: Aggregate) -> str:
    """What a cell's interval rests on, e.g. "1 effective seed of 3 run; 24 test patients
    resampled; difference over 3 distinct seed pairs"."""
    text = (f"{_seeds(agg.effective_seeds, agg.n_seeds)}; "
            f"{agg.n_units} test {agg.resampling} resampled")
    d = agg.diff_vs_ssl
    if d:
        n = d.n_effective_seeds if d.n_effective_seeds is not None else d.n_seeds
        text += f"; difference over {n} distinct seed {'pair' if n == 1 else 'pairs'}"
    return text


def _resampling_sentence(info: dict | None) -> str:
    if not info:
        return ""
    if info["unit"] == "patients":
        return f"Intervals resample its {info['n_units']} test patients (all images of a patient together)."
    return (f"Intervals resample its {info['n_units']} test images: the task records no patient ids, "
            f"so images count as independent (the intervals are too narrow if a patient has several).")


def _input_words(cfg: FinetuneRunConfig) -> str:
    if volume_header(cfg):
        return "the input cubes above"
    return f"{cfg.input_size} px, identical recipe for every init"


def write_report(path: Path, cfg: FinetuneRunConfig, tasks: dict[str, dict], rows: list[CellRow],
                 aggregates: list[Aggregate]) -> None:
    """``report.md``: per task and protocol, AUC and ACC tables (inits side by side, with
    intervals and differences to the SSL init), then one line per cell on chance level; then
    the Calibration, Subgroups and Site shift sections (finetune/report_clinical.py)."""
    inits = cfg.init_list
    ref = reference(inits)
    others = [i for i in inits if i != ref]
    level = round(cfg.bootstrap.confidence * 100)
    lines = [
        "# medssl benchmark report", "",
        *volume_header(cfg),
        (f"Architecture `{cfg.model.arch}` at {_input_words(cfg)}. "
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
    skipped = [r for r in rows if r.status != "ok"]
    for name, info in tasks.items():
        lines += [f"## {name}", "", (f"Task type: {info['task']}; images train/val/test: "
                  f"{info['n']['train']}/{info['n']['val']}/{info['n']['test']}. "
                  f"{_resampling_sentence(info.get('resampling'))}").rstrip(), ""]
        lines += leakage_lines(info)
        for protocol in cfg.protocols:
            group = [a for a in aggregates if a.task == name and a.protocol == protocol]
            if not group:
                continue
            by = {(a.init, a.fraction): a for a in group}
            for metric in ("auc", "acc"):
                head = ["label fraction"] + [i.label for i in inits]
                if ref:
                    head += [f"Δ {ref.label} − {o.label}" for o in others]
                lines += [f"### {protocol}: {metric.upper()}", "",
                          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                for fraction in cfg.label_fractions:
                    cells = [f"{fraction:g}"]
                    for i in inits:
                        a = by.get((str(i), fraction))
                        cells.append(_fmt(getattr(a, f"{metric}_mean"), getattr(a, f"{metric}_ci"))
                                     if a else "skipped")
                    if ref:
                        for o in others:
                            a = by.get((str(o), fraction))
                            cells.append(_fmt_diff(a.diff_vs_ssl if a else None, metric))
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
            lines += ["Chance check (AUC interval against 0.5):", ""]
            for a in group:
                lines.append(f"- {a.init_label}, fraction {a.fraction:g}: AUC "
                             f"{_fmt(a.auc_mean, a.auc_ci)}, {_chance(a)} ({_basis(a)})")
            lines.append("")
        lines += explanation_lines(info)
    lines += clinical_sections(cfg, tasks, aggregates)
    if skipped:
        lines += ["## Skipped cells", ""]
        reasons: dict[tuple, int] = {}
        for r in skipped:
            k = (r.task, r.init_label, r.protocol + (f" (shift fold {r.fold})" if r.fold else ""), r.reason)
            reasons[k] = reasons.get(k, 0) + 1
        for (task, init, protocol, reason), n in sorted(reasons.items()):
            lines.append(f"- {task} / {init} / {protocol}: {n} cells skipped: {reason}")
        lines.append("")
    path.write_text("\n".join(lines))
