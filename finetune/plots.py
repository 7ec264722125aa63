"""Label-efficiency plots: test AUC against label fraction, one line per init with its CI band."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.config import FinetuneRunConfig
from medssl.results import Aggregate


def plot_task(path: Path, name: str, cfg: FinetuneRunConfig, aggregates: list[Aggregate]) -> None:
    """Label-efficiency plot: test AUC vs label fraction, one line per init with its CI band,
    one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [p for p in cfg.protocols if any(a.task == name and a.protocol == p for a in aggregates)]
    if not protocols:
        return
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.6), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        for init in cfg.init_list:
            pts = sorted((a.fraction, a.auc_mean, *a.auc_ci) for a in aggregates
                         if a.task == name and a.protocol == protocol and a.init == str(init))
            if not pts:
                continue
            x, m, lo, hi = (np.array(v, dtype=float) for v in zip(*pts))
            ax.plot(x, m, marker="o", label=init.label)
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
