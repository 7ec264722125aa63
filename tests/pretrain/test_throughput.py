"""benchmarks/throughput.py runs end to end on CPU at tiny size and reports every figure, per method."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"
KINDS = {"bare", "model", "aug", "model+aug", "end2end", "model/bare", "end2end/bare", "end2end/model"}


def _bench():
    spec = importlib.util.spec_from_file_location("throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--device", "cpu", "--batch", "8", "--load-size", "40", "--workers", "1", "--steps", "1",
        "--warmup", "1", "--rounds", "1", "--gen-samples", "16", "--precision", "no"]


def test_throughput_one_config(tmp_path: Path):
    out = tmp_path / "t.json"
    figures = _bench().main([*TINY, "--arch", "resnet10t", "--size", "32", "--json", str(out)])
    results = figures["simclr"]
    assert set(results) == KINDS and all(v > 0 for v in results.values())
    assert results["end2end/model"] == results["end2end"] / results["model"]
    assert json.loads(out.read_text())["results"]["simclr"] == results


def test_throughput_every_method_preset(tmp_path: Path):
    """Every preset (SimCLR, MAE, DINO multi-crop, MICLe pairs, SimCLR and MAE on volumes) at
    tiny size: all eight figures."""
    out = tmp_path / "all.json"
    figures = _bench().main([*TINY, "--preset", "all", "--tiny", "--json", str(out)])
    assert set(figures) == {"simclr", "mae", "dino", "micle", "simclr3d", "mae3d"}
    for name, results in figures.items():
        assert set(results) == KINDS and all(v > 0 for v in results.values()), name
    assert json.loads(out.read_text())["results"].keys() == figures.keys()
