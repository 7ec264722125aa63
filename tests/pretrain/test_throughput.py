"""benchmarks/throughput.py runs end to end on CPU at tiny size and reports every figure."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


def test_throughput_tiny_cpu(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "t.json"
    results = module.main(["--device", "cpu", "--arch", "resnet10t", "--batch", "8", "--size", "32",
                           "--load-size", "40", "--workers", "1", "--steps", "2", "--warmup", "1",
                           "--rounds", "1", "--gen-samples", "16", "--precision", "no", "--json", str(out)])
    assert set(results) == {"bare", "model", "model+aug", "end2end", "end2end/model", "model/bare"}
    assert all(v > 0 for v in results.values())
    assert results["end2end/model"] == results["end2end"] / results["model"]
    assert out.is_file()
