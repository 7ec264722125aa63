"""Ingestion benchmark: `medssl shard` throughput and memory on a synthetic 512x512 CT corpus.

Builds the synthetic DICOM corpus at 1x and 10x a base size (``medssl.data.synth``), shards
each with ``--workers 1`` and ``--workers N`` in a fresh process, and prints per run:
files/s and slices/s (wall), slices/s per worker, slices per CPU-second (parent + workers,
the per-worker rate with no contention), and peak memory of the whole process tree (PSS,
sampled with psutil) and of its largest process (RSS). Cost should grow linearly with the corpus and
memory stay flat; the target is >= 100 slices/s per worker at 512x512.

    python benchmarks/ingest.py                          # 4 patients x 10 slices, then 10x
    python benchmarks/ingest.py --patients 8 --workers 1,4 --json ingest.json

Not a test: numbers depend on the machine. On a shared machine, read the CPU-second column.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def _child(argv: list[str]) -> None:
    """Run one `medssl shard` in this process, after imports, and print timing as JSON."""
    from medssl.cli import main
    from medssl.data import dicom, readers, shard  # noqa: F401 - warm imports, not timed

    def cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # pool workers, once joined
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    cpu0, wall0 = cpu(), time.perf_counter()
    code = main(["shard", *argv])
    result = {"code": code, "wall_s": time.perf_counter() - wall0, "cpu_s": cpu() - cpu0}
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(sum of PSS, max RSS) in bytes over a process and its descendants.

    PSS (proportional set size) splits pages shared between the parent and its forked workers
    (torch, numpy, pydicom) among them; summing RSS would count them once per process.
    """
    pss, rss = [], []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        pss.append(getattr(info, "pss", info.rss))
        rss.append(info.rss)
    return sum(pss), max(rss, default=0)


def run_shard(corpus: Path, out: Path, salt: Path, workers: int, *extra: str) -> dict:
    """One ``medssl shard`` in a child process: its wall and CPU time, the peak memory of its
    process tree (sampled every 50 ms), and counts from its index.json. ``extra``: more
    ``medssl shard`` arguments (benchmarks/ingest_volumes.py passes ``--volumes``)."""
    cmd = [sys.executable, __file__, "--child", str(corpus), "--out", str(out), "--workers",
           str(workers), "--salt-file", str(salt), "--shard-size", "1000", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ps = psutil.Process(proc.pid)
    peak_sum = peak_max = 0
    while proc.poll() is None:
        try:
            total, largest = _tree_memory(ps)
        except psutil.Error:
            break
        peak_sum, peak_max = max(peak_sum, total), max(peak_max, largest)
        time.sleep(0.05)
    stdout = proc.communicate()[0]
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"shard run failed (exit {proc.returncode}): {' '.join(cmd)}")
    result = json.loads(lines[-1][len("RESULT "):])
    index = json.loads((out / "index.json").read_text())
    result.update(
        files=index["inputs"]["seen"],
        quarantined=index["inputs"]["quarantined"],
        slices=sum(s["samples"] for s in index["splits"].values()),
        peak_pss_tree_mb=peak_sum / 2**20,
        peak_rss_largest_mb=peak_max / 2**20,
        shard_mb=sum(p.stat().st_size for p in out.glob("*.tar")) / 2**20,
    )
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=4, help="patients at scale 1")
    parser.add_argument("--slices", type=int, default=10, help="slices per patient")
    parser.add_argument("--size", type=int, default=512, help="slice side (px)")
    parser.add_argument("--scales", default="1,10", help="corpus multiples of --patients")
    parser.add_argument("--workers", default=f"1,{min(4, os.cpu_count() or 1)}",
                        help="worker counts to compare")
    parser.add_argument("--work-dir", type=Path, help="where corpora and shards go (default: tmp)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    worker_counts = list(dict.fromkeys(int(w) for w in args.workers.split(",")))

    from medssl.data.synth import write_corpus

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="medssl-ingest-"))
    salt = work / "bench.salt"
    work.mkdir(parents=True, exist_ok=True)
    salt.write_bytes(os.urandom(32))
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; work dir {work}")
    header = ("scale", "workers", "files", "slices", "wall_s", "files/s", "slices/s",
              "slices/s/worker", "slices/cpu_s", "peak_pss_tree_MB", "peak_rss_max_MB", "shards_MB")
    print("\t".join(header))
    results = []
    for scale in scales:
        corpus = work / f"corpus-x{scale}"
        t0 = time.perf_counter()
        write_corpus(corpus, patients=args.patients * scale, slices=args.slices, size=args.size)
        print(f"# synth x{scale}: {args.patients * scale} patients x {args.slices} slices at "
              f"{args.size}px in {time.perf_counter() - t0:.1f}s")
        for workers in worker_counts:
            out = work / f"shards-x{scale}-w{workers}"
            r = run_shard(corpus, out, salt, workers)
            r.update(scale=scale, workers=workers)
            results.append(r)
            print("\t".join(str(v) for v in (
                scale, workers, r["files"], r["slices"], f"{r['wall_s']:.2f}",
                f"{r['files'] / r['wall_s']:.1f}", f"{r['slices'] / r['wall_s']:.1f}",
                f"{r['slices'] / r['wall_s'] / workers:.1f}", f"{r['slices'] / r['cpu_s']:.1f}",
                f"{r['peak_pss_tree_mb']:.0f}", f"{r['peak_rss_largest_mb']:.0f}",
                f"{r['shard_mb']:.1f}")), flush=True)
    if len(scales) > 1:
        lo, hi = min(scales), max(scales)
        for workers in worker_counts:
            a = next(r for r in results if r["scale"] == lo and r["workers"] == workers)
            b = next(r for r in results if r["scale"] == hi and r["workers"] == workers)
            marginal = (b["slices"] - a["slices"]) / max(b["cpu_s"] - a["cpu_s"], 1e-9)
            print(f"# workers={workers}: x{hi // lo} data -> wall "
                  f"x{b['wall_s'] / a['wall_s']:.1f}, CPU x{b['cpu_s'] / a['cpu_s']:.1f} "
                  f"(marginal {marginal:.0f} slices/cpu_s: fixed start-up cost excluded), "
                  f"peak tree PSS x{b['peak_pss_tree_mb'] / a['peak_pss_tree_mb']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
