"""The clinical figures: a reliability diagram and a subgroup forest plot per task.

Both read the JSON-ready entries that finetune/calibration.py and finetune/subgroups.py put in
results.json (docs/results_schema.md), so the figures can be redrawn from results.json alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from finetune.config import FinetuneRunConfig
from medssl.init import Init
from medssl.results import Aggregate


def clinical_plot_names(task: str, protocol: str) -> dict[str, str]:
    """File names (under ``plots/``) of a task's figures for one protocol."""
    return {"reliability": f"{task}-{protocol}-reliability.png", "subgroups": f"{task}-{protocol}-subgroups.png"}


def figure_fraction(aggregates: list[Aggregate], task: str, protocol: str, key: str) -> float | None:
    """The label fraction a task's figure shows for a protocol: the largest with a ``key``
    entry (``calibration`` or ``subgroups``), None when there is none."""
    fractions = [a.fraction for a in aggregates
                 if a.task == task and a.protocol == protocol and getattr(a, key) is not None]
    return max(fractions) if fractions else None


def plot_task_clinical(plots_dir: Path, task: str, cfg: FinetuneRunConfig, aggregates: list[Aggregate]) -> None:
    """Per protocol, at its largest label fraction: the reliability diagram (one panel per init)
    and, with subgroups, the forest plot (``clinical_plot_names``)."""
    order = [str(i) for i in cfg.init_list]
    for protocol in cfg.protocols:
        names = clinical_plot_names(task, protocol)
        for key, plot in (("calibration", plot_reliability), ("subgroups", plot_forest)):
            fraction = figure_fraction(aggregates, task, protocol, key)
            if fraction is None:
                continue
            group = sorted((a for a in aggregates if a.task == task and a.protocol == protocol
                            and a.fraction == fraction and getattr(a, key) is not None),
                           key=lambda a: order.index(a.init) if a.init in order else len(order))
            entries = {a.init: dataclasses.asdict(getattr(a, key)) for a in group}
            plot(plots_dir / names["reliability" if key == "calibration" else "subgroups"],
                 f"{task} {protocol}, label fraction {fraction:g}", entries)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(path: Path, title: str, entries: dict[str, dict[str, Any]], binning: str = "width") -> None:
    """Reliability diagram, one panel per init: accuracy (observed frequency, for multi-label)
    against mean confidence per bin, before and after temperature scaling, with the diagonal and
    the ECEs in the legend. entries: init -> its ``calibration`` entry. Empty bins are skipped;
    a marker's area grows with its bin's count."""
    plt = _pyplot()
    inits = list(entries)
    fig, axes = plt.subplots(1, len(inits), figsize=(3.6 * len(inits), 3.8), squeeze=False)
    for ax, init in zip(axes[0], inits):
        e = entries[init]
        for stage, style in (("before", {"color": "tab:red", "marker": "o"}),
                             ("after", {"color": "tab:blue", "marker": "s"})):
            rel = e["reliability"][stage][binning]
            pts = [(c, a, n) for c, a, n in zip(rel["confidence"], rel["accuracy"], rel["count"])
                   if c is not None and a is not None and n > 0]
            if not pts:
                continue
            c, a, n = (np.array(v, dtype=float) for v in zip(*pts))
            ece = e["ece"][binning][stage]
            label = f"{stage} T: ECE {ece['mean']:.3f}" if ece["mean"] is not None else stage
            ax.plot(c, a, lw=1, **style, markersize=0, label=label)
            ax.scatter(c, a, s=10 + 60 * n / n.max(), color=style["color"], marker=style["marker"], zorder=3)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence" if e.get("kind") == "top-label" else "predicted probability")
        ax.set_ylabel("accuracy" if e.get("kind") == "top-label" else "observed frequency")
        ax.set_title(f"{Init.parse(init).label}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{title}: reliability ({binning} bins)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_forest(path: Path, title: str, entries: dict[str, dict[str, Any]], metric: str = "auc") -> None:
    """Forest plot, one panel per attribute: one row per subgroup, one point with its interval
    per init (offset vertically), "not estimable" written where a group has no figure, and the
    gap per init in the panel title. entries: init -> its ``subgroups`` entry."""
    plt = _pyplot()
    inits = list(entries)
    attrs = list(next(iter(entries.values()))["attributes"]) if entries else []
    if not attrs:
        return
    n_rows = [len(entries[inits[0]]["attributes"][a]["groups"]) for a in attrs]
    fig, axes = plt.subplots(1, len(attrs), figsize=(4.6 * len(attrs), 1.2 + 0.45 * max(n_rows) * len(inits) ** 0.5),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, a in zip(axes[0], attrs):
        groups = list(entries[inits[0]]["attributes"][a]["groups"])
        step = 0.7 / max(len(inits), 1)
        gaps = []
        for j, init in enumerate(inits):
            block = entries[init]["attributes"][a]
            for r, g in enumerate(groups):
                y = r + (j - (len(inits) - 1) / 2) * step
                d = block["groups"][g]
                if d["status"] != "ok":
                    if j == 0:
                        ax.text(0.5, r, "not estimable", ha="center", va="center", fontsize=7, color="grey",
                                transform=ax.get_yaxis_transform())
                    continue
                m = d[metric]
                if m["mean"] is None:
                    continue
                lo, hi = m["ci"]
                if lo is not None and hi is not None:
                    ax.plot([lo, hi], [y, y], color=colors[j % len(colors)], lw=1.5)
                ax.plot([m["mean"]], [y], "o", color=colors[j % len(colors)], markersize=4,
                        label=Init.parse(init).label)
            gap = block["gap"]
            if gap.get("status") == "ok" and gap[metric].get("mean") is not None:
                gaps.append(f"{Init.parse(init).label} gap {gap[metric]['mean']:.2f}")
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels(groups)
        ax.set_ylim(len(groups) - 0.5, -0.5)  # first group on top, room for every init's offset
        ax.set_xlabel(f"test {metric.upper() if metric in ('auc', 'acc') else metric}")
        if metric == "auc":
            ax.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{a}" + (f"\n{'; '.join(gaps)}" if gaps else ""), fontsize=9)
    legend: dict = {}
    for ax in axes[0]:
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles))  # one entry per init, not per row or panel
    fig.suptitle(f"{title}: {metric} by subgroup", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.legend(legend.values(), legend.keys(), fontsize=8, loc="center right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
