"""Volume ingestion benchmark: `medssl shard --volumes` on synthetic CT series, 1x and 10x.

Writes the synthetic series corpus (``medssl synth --volumes``) at 1x and 10x a base number of
patients, shards each with ``--volumes --spacing S`` in a fresh process (``benchmarks/ingest.py``'s
child: timing after imports, CPU of the parent plus its joined workers), and prints per run:
volumes/s (wall), volumes per CPU-second, the marginal rate between the two scales (fixed
start-up excluded: torch and MONAI imports, worker spawn), and peak memory of the process tree
(summed PSS) and of its largest process (RSS). Memory should stay flat from 1x to 10x: each
worker holds one volume at a time.

    python benchmarks/ingest_volumes.py                         # 10 and 100 patients
    python benchmarks/ingest_volumes.py --patients 4 --workers 1 --json vol.json

Not a test: numbers depend on the machine. On a shared machine, read the CPU-second column.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import run_shard as run_shard_2d  # the same child process and memory sampling


def run_shard(corpus: Path, out: Path, salt: Path, workers: int, spacing: str) -> dict:
    """benchmarks/ingest.py's measured run with ``--volumes``; ``volumes``: samples written."""
    result = run_shard_2d(corpus, out, salt, workers, "--volumes", "--spacing", spacing)
    result["volumes"] = result.pop("slices")   # one sample per volume
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=10, help="series at scale 1")
    parser.add_argument("--slices", type=int, default=32, help="slices per series")
    parser.add_argument("--size", type=int, default=64, help="slice side (px)")
    parser.add_argument("--spacing", default="4,4,4", help="--spacing of the shard runs")
    parser.add_argument("--scales", default="1,10", help="corpus multiples of --patients")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--work-dir", type=Path, help="where corpora and shards go (default: tmp)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    worker_counts = list(dict.fromkeys(int(w) for w in args.workers.split(",")))

    from medssl.data.synth_volumes import write_volume_corpus

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="medssl-ingest-volumes-"))
    work.mkdir(parents=True, exist_ok=True)
    salt = work / "bench.salt"
    salt.write_bytes(os.urandom(32))
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; work dir {work}; "
          f"{args.slices} x {args.size}px series, --spacing {args.spacing}")
    header = ("scale", "workers", "volumes", "wall_s", "cpu_s", "volumes/s", "volumes/cpu_s",
              "peak_pss_tree_MB", "peak_rss_max_MB", "shards_MB")
    print("\t".join(header))
    results = []
    for scale in scales:
        corpus = work / f"corpus-x{scale}"
        t0 = time.perf_counter()
        write_volume_corpus(corpus, patients=args.patients * scale, slices=args.slices,
                            size=args.size)
        print(f"# synth x{scale}: {args.patients * scale} series in "
              f"{time.perf_counter() - t0:.1f}s")
        for workers in worker_counts:
            r = run_shard(corpus, work / f"shards-x{scale}-w{workers}", salt, workers,
                          args.spacing)
            r.update(scale=scale, workers=workers)
            results.append(r)
            print("\t".join(str(v) for v in (
                scale, workers, r["volumes"], f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                f"{r['volumes'] / r['wall_s']:.2f}", f"{r['volumes'] / r['cpu_s']:.2f}",
                f"{r['peak_pss_tree_mb']:.0f}", f"{r['peak_rss_largest_mb']:.0f}",
                f"{r['shard_mb']:.1f}")), flush=True)
    if len(scales) > 1:
        lo, hi = min(scales), max(scales)
        for workers in worker_counts:
            a = next(r for r in results if r["scale"] == lo and r["workers"] == workers)
            b = next(r for r in results if r["scale"] == hi and r["workers"] == workers)
            marginal = (b["volumes"] - a["volumes"]) / max(b["cpu_s"] - a["cpu_s"], 1e-9)
            print(f"# workers={workers}: x{hi // lo} volumes -> wall x{b['wall_s'] / a['wall_s']:.1f}"
                  f", CPU x{b['cpu_s'] / a['cpu_s']:.1f} (marginal {marginal:.1f} volumes/cpu_s), "
                  f"peak tree PSS x{b['peak_pss_tree_mb'] / a['peak_pss_tree_mb']:.2f}, largest "
                  f"RSS x{b['peak_rss_largest_mb'] / a['peak_rss_largest_mb']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
