"""Peak memory of `medssl shard` on decompression bombs and on large files it must still write.

Builds, in a temporary folder (``medssl.data.hostile``):

* bombs, each a few hundred bytes to ~800 KB: an RLE DICOM claiming 60000 x 60000, a deflated
  DICOM of 20000 x 20000 zeros, a PNG claiming 60000 x 60000, a NIfTI header claiming
  2000^3 voxels -- all must be quarantined as ``too_large`` without being decoded;
* files at the budget, which must be written: a DICOM frame and a PNG of exactly
  ``--max-pixels`` pixels (8192 x 8192 at the default), a NIfTI volume of ``--max-pixels``
  voxels (512 x 512 x 256 at the default), and a native multi-frame stack far larger than the
  budget in total (2048 x 2048 x 60 frames, ~500 MB: a tomosynthesis-like file, decoded frame
  by frame);
* a small synthetic CT corpus (ordinary good files).

Then runs ``medssl shard --workers N`` in a fresh process and samples, every 20 ms, the
resident memory of every process in its tree (RSS, and PSS where the kernel gives it). It
prints the peak RSS of the parent, of the largest worker, and of the whole tree (sum), and
checks the outcome file by file. Target: every worker under 1 GB.

Measured on a shared 2-core VM (Python 3.11, pydicom 3.0, nibabel 5.4, Pillow 13), default
``--max-pixels`` 67,108,864, ``--workers 2``: worker peak RSS 0.68 GiB (three runs), parent
0.63-0.65 GiB (torch, imported by WebDataset for the tar writer), whole tree 1.28-1.58 GiB;
11-13 s. ``--no-large`` (the bombs and the corpus): worker 0.21 GiB.

    python benchmarks/ingest_bombs.py                     # default budget, 2 workers
    python benchmarks/ingest_bombs.py --max-pixels 33554432 --workers 4 --json bombs.json
    python benchmarks/ingest_bombs.py --no-large          # bombs + corpus only, seconds

Not a test: numbers depend on the machine and its Python packages.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from medssl.data import hostile
from medssl.data.budget import DEFAULT_MAX_PIXELS

GB = 1 << 30  # GiB, as RSS is counted


def build(folder: Path, max_pixels: int, large: bool) -> dict[str, str]:
    """Write the inputs; return {file name: expected outcome}."""
    from medssl.data.synth import write_corpus

    expected = {}
    bombs = folder / "bombs"
    bombs.mkdir(parents=True)
    for name, make in (("rle_60000.dcm", hostile.rle_bomb), ("deflate_20000.dcm",
                       hostile.deflate_bomb), ("png_60000.png", hostile.png_bomb),
                       ("nifti_2000cubed.nii", hostile.nifti_bomb)):
        make(bombs / name)
        expected[name] = "too_large"
    if large:
        big = folder / "large"
        big.mkdir()
        side = math.isqrt(max_pixels)
        hostile.multiframe(big / f"frame_{side}.dcm", side, side, 1)
        expected[f"frame_{side}.dcm"] = "written"
        _png(big / f"page_{side}.png", side)
        expected[f"page_{side}.png"] = "written"
        depth = max_pixels // (512 * 512)
        _nifti(big / f"volume_512x512x{depth}.nii.gz", depth)
        expected[f"volume_512x512x{depth}.nii.gz"] = "written"
        hostile.multiframe(big / "tomo_2048x2048x60.dcm", 2048, 2048, 60)
        expected["tomo_2048x2048x60.dcm"] = "written"
    write_corpus(folder / "corpus", patients=4, slices=4, size=256, seed=0)
    return expected


def _png(path: Path, side: int) -> None:
    from PIL import Image

    row = (np.arange(side) % 251).astype(np.uint8)
    image = np.broadcast_to(row, (side, side))
    Image.fromarray(np.ascontiguousarray(image), mode="L").save(path, compress_level=1)


def _nifti(path: Path, depth: int) -> None:
    import nibabel as nib

    volume = np.empty((512, 512, depth), np.int16)
    ramp = (np.arange(512, dtype=np.int16)[:, None] + np.arange(512, dtype=np.int16)[None, :])
    for z in range(depth):
        volume[:, :, z] = ramp + z
    image = nib.Nifti1Image(volume, np.diag([0.7, 0.7, 1.0, 1.0]))
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, path)


def _sample(proc: psutil.Process) -> dict[int, tuple[int, int]]:
    """{pid: (rss, pss)} of a process and its descendants, in bytes."""
    out = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        out[p.pid] = (info.rss, getattr(info, "pss", info.rss))
    return out


def run(inputs: list[Path], out: Path, workers: int, max_pixels: int) -> dict:
    salt = out.parent / "bench.salt"
    salt.write_bytes(bytes(range(32)))
    cmd = [sys.executable, "-m", "medssl", "shard", *map(str, inputs), "--out", str(out),
           "--workers", str(workers), "--salt-file", str(salt), "--max-pixels", str(max_pixels),
           "--max-bad", "1"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak_rss: dict[int, int] = {}
    peak_tree_rss = peak_tree_pss = 0
    while proc.poll() is None:
        try:
            now = _sample(parent)
        except psutil.Error:
            break
        for pid, (rss, _) in now.items():
            peak_rss[pid] = max(peak_rss.get(pid, 0), rss)
        peak_tree_rss = max(peak_tree_rss, sum(r for r, _ in now.values()))
        peak_tree_pss = max(peak_tree_pss, sum(p for _, p in now.values()))
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"shard run failed (exit {proc.returncode}):\n{stderr[-2000:]}")
    others = [v for pid, v in peak_rss.items() if pid != proc.pid]
    return {"wall_s": time.perf_counter() - start, "workers": workers, "max_pixels": max_pixels,
            "parent_peak_rss": peak_rss.get(proc.pid, 0),
            "worker_peak_rss": max(others, default=0),
            "tree_peak_rss": peak_tree_rss, "tree_peak_pss": peak_tree_pss,
            "result_line": stdout.strip().splitlines()[-1] if stdout.strip() else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--no-large", action="store_true", help="bombs and the corpus only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medssl-bombs-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        expected = build(root / "in", args.max_pixels, large=not args.no_large)
        print(f"built {len(expected)} hostile/large files + corpus in "
              f"{time.perf_counter() - t0:.0f} s")
        figures = run([root / "in"], root / "shards", args.workers, args.max_pixels)
        report = {Path(r["path"]).name: r for r in
                  map(json.loads, (root / "shards.report.jsonl").read_text().splitlines())}
    wrong = [f"{name}: expected {want}, got {report.get(name)}" for name, want in expected.items()
             if (report.get(name) or {}).get("outcome" if want == "written" else "reason") != want]
    figures["outcomes_as_expected"] = not wrong
    print(figures["result_line"])
    print(f"peak RSS: worker {figures['worker_peak_rss'] / GB:.2f} GiB, parent "
          f"{figures['parent_peak_rss'] / GB:.2f} GiB, whole tree {figures['tree_peak_rss'] / GB:.2f}"
          f" GiB (PSS {figures['tree_peak_pss'] / GB:.2f} GiB); --workers {args.workers}, "
          f"--max-pixels {args.max_pixels:,}; {figures['wall_s']:.0f} s")
    for line in wrong:
        print("UNEXPECTED", line)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
