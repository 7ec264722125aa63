"""slurm/benchmark.sbatch on a real one-node cluster: the planner job fans a suite out as an
array (one element per task x init), and the dependent merge job writes one results.json and
report.md equal to a single `medssl finetune` run of the whole config."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from slurm_helpers import FINISHED, REPO, array_states, cancel, job_fields, sbatch, wait_for

sys.path.insert(0, str(REPO / "tests" / "finetune"))
from finetune_data import write_labeled_shards  # the finetune tests' data maker


def _load_bench():
    spec = importlib.util.spec_from_file_location("medssl_slurm_bench", REPO / "slurm" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _config(tmp_path: Path, tasks: list[dict], inits: list[str], **extra: object) -> Path:
    cfg = {**extra,
        "output_dir": str(tmp_path / "bench"),
        "model": {"arch": "test_efficientnet"},
        "inits": inits,
        "tasks": tasks,
        "protocols": ["knn", "linear"],
        "label_fractions": [1.0],
        "seeds": [0, 1],
        "input_size": 32,
        "linear": {"Cs": [0.1, 1.0]},
        "bootstrap": {"n": 50},
        "device": "cpu",
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_elements_cover_every_task_init_pair_once(tmp_path: Path) -> None:
    tasks = [{"name": n, "kind": "shards", "path": str(tmp_path / n)} for n in ("a", "b")]
    for t in tasks:
        Path(t["path"]).mkdir()
    cfg = bench._load(str(_config(tmp_path, tasks, ["random", "ssl:/x/pub", "imagenet"])), [])
    pairs = set()
    dirs = set()
    for i in range(6):
        ov = dict(o.split("=", 1) for o in bench.element_overrides(cfg, i))
        one = bench._load(str(tmp_path / "bench.yaml"), [f"{k}={v}" for k, v in ov.items()])
        assert len(one.tasks) == 1 and len(one.inits) == 1
        assert one.tasks[0] == cfg.tasks[i // 3]   # the whole task config survives the override
        pairs.add((one.tasks[0].name, one.inits[0]))
        dirs.add(one.output_dir)
    assert len(pairs) == 6 and len(dirs) == 6
    assert all(d.startswith(str(tmp_path / "bench" / bench.PARTS_DIR)) for d in dirs)
    with pytest.raises(Exception, match="outside 0..5"):
        bench.element_overrides(cfg, 6)


@pytest.mark.slurm
@pytest.mark.slow
def test_array_runs_and_merge_equals_single_run(slurm_cluster: None, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # jobs inherit the environment
    tasks = []
    for name, seed in (("left", 1), ("right", 2)):
        folder = write_labeled_shards(tmp_path / "data" / name, kind="binary", seed=seed,
                                      patients=20, per_patient=3, size=24)
        tasks.append({"name": name, "kind": "shards", "path": str(folder)})
    # Fixed weights, so that a run in another process can be compared number for number
    # (finetune draws a random init from the process's global RNG).
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "weights.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(weights))
    config = _config(tmp_path, tasks, ["imagenet"], imagenet_weights=str(weights))
    plan_log = tmp_path / "plan.out"

    plan = array = merge = ""
    try:
        plan = sbatch([f"--output={plan_log}", str(REPO / "slurm" / "benchmark.sbatch"), str(config)],
                      cwd=tmp_path)
        wait_for(lambda: job_fields(plan).get("JobState") in FINISHED, 120, "the planner job",
                 on_timeout=lambda: plan_log.read_text() if plan_log.exists() else "")
        text = plan_log.read_text()
        assert job_fields(plan)["JobState"] == "COMPLETED", text
        array, merge = re.search(r"array=(\d+) merge=(\d+)", text).groups()
        assert "2 elements" in text

        def logs() -> str:
            return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("slurm-*.out")))

        wait_for(lambda: job_fields(merge).get("JobState") in FINISHED, 300, "the merge job",
                 poll=1.0, on_timeout=logs)
        assert job_fields(merge)["JobState"] == "COMPLETED", logs()
        assert set(array_states(array)) == {"COMPLETED"}, logs()
    finally:
        cancel(plan, array, merge)

    out = tmp_path / "bench"
    parts = sorted(p.name for p in (out / bench.PARTS_DIR).iterdir())
    assert parts == ["left__imagenet", "right__imagenet"]
    # Each element's log lands in the submit dir, one per array index.
    assert {p.name for p in tmp_path.glob("slurm-*_*.out")} >= {f"slurm-medssl-bench-{array}_0.out",
                                                                  f"slurm-medssl-bench-{array}_1.out"}
    merged = json.loads((out / "results.json").read_text())
    assert (out / "report.md").read_text().count("## ") >= 2   # a section per task

    # The merge loses and duplicates nothing: its rows are exactly the parts' finished cells.
    from finetune.cells import CellStore

    part_rows = {}
    for name in parts:
        part_rows.update(CellStore(out / bench.PARTS_DIR / name).rows)
    assert len(merged["rows"]) == 2 * 2 * 2 == len(part_rows)
    assert {r["key"]: (r["auc"], r["acc"]) for r in merged["rows"]} == \
        {k: (r.auc, r.acc) for k, r in part_rows.items()}
    assert {(a["task"], a["protocol"]) for a in merged["aggregates"]} == \
        {(t, p) for t in ("left", "right") for p in ("knn", "linear")}
    assert all(a["n_seeds"] == 2 for a in merged["aggregates"])

    # An element run again (a requeue, a resubmission) finds its cells done and redoes none.
    part = out / bench.PARTS_DIR / "right__imagenet"
    before = (part / "cells.jsonl").read_text()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert bench.main(["element", str(config)]) == 0
    assert (part / "cells.jsonl").read_text() == before

    # Reference: the same suite in one process, without Slurm.
    from finetune.runner import finetune_command

    ref_out = tmp_path / "single"
    assert finetune_command(config, [f"output_dir={ref_out}"]) == 0
    single = json.loads((ref_out / "results.json").read_text())

    def rows(results: dict) -> dict:
        return {(r["task"], r["protocol"], r["seed"]): (r["status"], r["auc"], r["acc"])
                for r in results["rows"]}

    def aggregates(results: dict) -> list:
        return sorted((a["task"], a["protocol"], a["auc_mean"], tuple(a["auc_ci"]), a["acc_mean"])
                      for a in results["aggregates"])

    assert rows(merged) == rows(single)
    assert aggregates(merged) == aggregates(single)
