"""Optional Weights & Biases logging of a benchmark: one log call per finished cell, and the
results and aggregate tables at the end. ``logging.wandb: disabled`` never imports wandb.

The run id is kept in ``<output_dir>/wandb_id.txt`` so a resumed benchmark continues its run.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from finetune.config import FinetuneRunConfig
from medssl.config import to_dict
from medssl.results import Aggregate, CellRow

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, cfg: FinetuneRunConfig, out: Path) -> None:
        self.run = None
        if cfg.logging.wandb == "disabled":
            return
        import wandb

        id_file = out / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=cfg.logging.wandb_project, mode=cfg.logging.wandb, dir=str(out),
                              id=run_id, resume="allow", config=to_dict(cfg), job_type="finetune")

    def log_row(self, row: CellRow) -> None:
        if self.run is None:
            return
        prefix = f"{row.task}/{row.protocol}/{row.init_label}/frac{row.fraction:g}"
        if row.fold:  # a site-shift cell: its auc/acc are on the held-out site
            prefix += f"/shift-{row.fold}"
        self.run.log({f"{prefix}/auc": row.auc, f"{prefix}/acc": row.acc, "cell_seed": row.seed})

    def finish(self, rows: list[CellRow], aggregates: list[Aggregate]) -> None:
        if self.run is None:
            return
        import wandb

        cols = ["task", "init_label", "protocol", "fraction", "seed", "fold", "status", "auc", "acc", "n_train",
                "reason"]
        self.run.log({"results": wandb.Table(columns=cols, data=[[getattr(r, c) for c in cols] for r in rows])})
        acols = ["task", "init_label", "protocol", "fraction", "auc_mean", "acc_mean", "n_seeds",
                 "n_effective_seeds", "resampling", "n_units"]
        table = [[getattr(a, c) for c in acols] + [str(a.auc_ci), str(a.acc_ci)] for a in aggregates]
        self.run.log({"aggregates": wandb.Table(columns=acols + ["auc_ci", "acc_ci"], data=table)})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
