"""Fan a ``medssl finetune`` suite out over a Slurm job array, then merge the parts.

Used by ``slurm/benchmark.sbatch``; each sub-command takes the same ``CONFIG.yaml [key=value ...]``
the user gave to ``medssl finetune``:

``python slurm/bench.py count CONFIG ...``
    prints the number of array elements: one per (task, init) pair, tasks outer.
``python slurm/bench.py element CONFIG ...``  (in array element ``SLURM_ARRAY_TASK_ID``)
    runs ``medssl finetune`` on that pair alone, in ``<output_dir>/slurm-parts/<task>__<init>``.
    The part dir does not depend on the job id, so a requeued or resubmitted element skips the
    cells it already finished (finetune's own resume).
``python slurm/bench.py merge CONFIG ...``
    copies every part's finished cells (``cells.jsonl`` rows and their test scores) into
    ``<output_dir>``'s cell store, then runs ``medssl finetune`` on the whole config there: with
    every cell already finished it only recomputes the aggregates (bootstrap intervals and the
    paired ssl-vs-other differences need all inits of a task together) and rewrites
    ``results.json``, ``report.md`` and the plots. The merge is therefore exactly what a single
    uninterrupted ``medssl finetune`` run would have written.

This is a script in ``slurm/`` rather than part of ``finetune/`` because it only matters under
Slurm; it uses finetune's public pieces (config, CellStore, the CLI) and adds only the split.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from medssl.errors import MedsslError

log = logging.getLogger("medssl.slurm")

PARTS_DIR = "slurm-parts"


def _load(config: str, overrides: Sequence[str]):
    from finetune.config import FinetuneRunConfig
    from medssl.config import load_config

    return load_config(FinetuneRunConfig, config, list(overrides))


def elements(cfg) -> list[tuple[object, str]]:
    """The (task config, init) pair of each array element, in array-index order."""
    return [(task, init) for task in cfg.tasks for init in cfg.inits]


def part_dir(output_dir: str | Path, task_name: str, init: str) -> Path:
    """Where one element writes: stable across requeues and resubmissions of the same config."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", init).strip("_") or "init"
    return Path(output_dir) / PARTS_DIR / f"{task_name}__{slug}"


def element_overrides(cfg, index: int) -> list[str]:
    """``key=value`` overrides that narrow the whole config to array element ``index``."""
    import json

    from medssl.config import to_dict

    pairs = elements(cfg)
    if not 0 <= index < len(pairs):
        raise MedsslError(f"SLURM_ARRAY_TASK_ID={index} is outside 0..{len(pairs) - 1} "
                          f"({len(cfg.tasks)} tasks x {len(cfg.inits)} inits); resubmit the benchmark")
    task, init = pairs[index]
    # JSON is YAML, so the override parser reads these flow lists back exactly.
    return [
        "tasks=" + json.dumps([to_dict(task)]),
        "inits=" + json.dumps([init]),
        f"output_dir={part_dir(cfg.output_dir, task.name, init)}",
    ]


def merge_parts(cfg) -> int:
    """Copy the parts' finished cells into ``cfg.output_dir``'s store; returns cells copied.

    Raises MedsslError naming a part dir that is missing (its element never ran)."""
    from finetune.cells import CellStore

    out = Path(cfg.output_dir)
    store = CellStore(out)
    copied = 0
    for i, (task, init) in enumerate(elements(cfg)):
        part = part_dir(out, task.name, init)
        if not (part / "cells.jsonl").is_file():
            raise MedsslError(f"{part}: no cells.jsonl; array element {i} ({task.name} x {init}) "
                              "did not finish: see its log, then resubmit the benchmark")
        source = CellStore(part)
        for key, row in source.rows.items():
            if key not in store:
                store.add(row, source.scores(key), source.val_scores(key))
                copied += 1
    log.info("merged %d new cells from %d parts into %s", copied, len(elements(cfg)), out)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    from medssl.cli import main as medssl_main
    from medssl.logging import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("count", "element", "merge"):
        sys.stderr.write("usage: bench.py count|element|merge CONFIG.yaml [key=value ...]\n")
        return 2
    action, config, overrides = argv[0], argv[1], argv[2:]
    setup_logging()
    try:
        cfg = _load(config, overrides)
        if action == "count":
            print(len(elements(cfg)))
            return 0
        if action == "element":
            index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "-1"))
            extra = element_overrides(cfg, index)
            task, init = elements(cfg)[index]
            log.info("array element %d: task %s, init %s -> %s", index, task.name, init, extra[-1])
            return medssl_main(["finetune", config, *overrides, *extra])
        merge_parts(cfg)
        return medssl_main(["finetune", config, *overrides])
    except MedsslError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
