"""``medssl explain BENCHMARK_DIR``: explanations of a finished benchmark, with its own config.

The benchmark's saved ``config.yaml`` says what was benchmarked; ``ExplainConfig`` (from the
command line) says what to draw. Finished cells are read from ``cells.jsonl``; nothing is
benchmarked anew. Records and grids go to ``BENCHMARK_DIR/explain/`` (finetune's own folder
for them), with ``explanations.json`` and ``explanations.md`` listing every map set.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from finetune.cells import CellStore
from finetune.config import FinetuneRunConfig
from finetune.explain_config import ExplainConfig
from finetune.explanations import EXPLAIN_DIR, check_config, explain_task, report_lines
from finetune.runner import resolve_device
from finetune.tasks import load_task
from medssl.errors import MedsslError
from medssl.init import Init
from medssl.io import atomic_write_json, atomic_write_text
from medssl.results import json_safe


def explain_benchmark(bench: Path, ecfg: ExplainConfig, inits: list[str] | None = None) -> dict:
    """``medssl explain BENCHMARK_DIR``: explain the finished cells of a benchmark with its own
    config; writes ``explain/explanations.json`` and ``explain/explanations.md``."""
    from medssl.config import build, read_yaml_tree

    bench = Path(bench)
    config = bench / "config.yaml"
    if not config.is_file():
        raise MedsslError(f"{config}: not found; give the output_dir of a `medssl finetune` run")
    tree = read_yaml_tree(config)
    tree.pop("git_sha", None)
    tree.setdefault("evaluation", {})["explain"] = dataclasses.asdict(ecfg)
    cfg = build(FinetuneRunConfig, tree, where=str(config))
    chosen = cfg.init_list
    if inits:
        chosen = [Init.parse(i) for i in inits]
        unknown = [str(i) for i in chosen if i not in cfg.init_list]
        if unknown:
            raise MedsslError(f"--init {unknown[0]}: not an init of this benchmark "
                              f"({', '.join(cfg.inits)})")
    check_config(cfg)
    store = CellStore(bench)
    if not store.rows:
        raise MedsslError(f"{bench / 'cells.jsonl'}: no finished cell to explain; run medssl finetune first")
    device = resolve_device(cfg.device)
    out: dict[str, Any] = {}
    lines = ["# Explanations", ""]
    for task_cfg in cfg.tasks:
        task = load_task(task_cfg, side=cfg.input_size)
        rows = [r for r in store.rows.values() if r.task == task.name]
        out[task.name] = explain_task(cfg, cfg.evaluation.explain, task_cfg, task, rows, store,
                                      device, bench, inits=chosen)
        lines += [f"## {task.name}", ""] + [
            line.replace("](explain/", "](") for line in report_lines({"explanations": out[task.name]})]
    folder = bench / EXPLAIN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "explanations.json", json_safe(out))
    atomic_write_text(folder / "explanations.md", "\n".join(lines))
    return out


def summary(out: dict[str, Any]) -> str:
    """The command's one result line: how many map sets, and their verdicts."""
    verdicts = [m["verdict"]["trustworthy"] for e in out.values() for m in e.get("maps", [])
                if m.get("status") == "ok"]
    skipped = sum(1 for e in out.values() for m in e.get("maps", []) if m.get("status") != "ok")
    words = {True: "trustworthy", False: "NOT trustworthy", None: "not shown trustworthy"}
    counts = ", ".join(f"{verdicts.count(k)} {w}" for k, w in words.items() if verdicts.count(k))
    return (f"explain: {len(verdicts)} map set(s) ({counts or 'none drawn'})"
            + (f", {skipped} skipped" if skipped else ""))
