"""Leakage benchmark: recall and false positives of the near-duplicate check, and its speed.

Builds, in a temporary folder, a "pretraining" shard folder of synthetic chest CT slices
(``medssl.data.synth.draw_patient``, 16-bit, window 40/400 HU) and a "task" folder of other
patients' slices, then injects into the pretraining folder transformed copies of task test
images. Each copy carries all five transforms at once, each at a random strength: resize
(x0.5 to x1.5), JPEG-like requantisation (8 bits in the window, JPEG quality 50-95, stored
back as 16-bit), rotation (up to 5 degrees), crop (up to 10% of each side's length, at a
random place) and brightness (up to 10% of the window's contrast). Slices of one patient look
alike, so patients never cross sets and pairs of a copy with the other slices of its source
patient count as neither hit nor false positive.

Two corpora: a calibration one (seed 1, 200 copies) chooses the smallest radius whose recall
reaches the target (0.97, above the issue's 0.95 to leave room for sampling error); a held-out one (seed 2, 50 copies, as the issue asks) measures recall
(with a Wilson 95% interval), the false-positive rate among unrelated cross-set pairs, the
task images wrongly flagged, and the time per 10,000 images. Also the recall of each
transform alone at its full strength, on the held-out corpus.

    python benchmarks/leakage.py                     # 625 + 100 patients x 8 slices each
    python benchmarks/leakage.py --patients 1250 --json leakage-bench.json

Not a test: figures depend on the corpus and the machine. The synthetic chests are a hard
case on purpose: every patient is drawn from one template, so unrelated slices are far more
alike than two real patients' slices.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from scipy import ndimage

from medssl.data.sample import encode_intensity, encode_png
from medssl.data.shards import FORMAT, file_sha256
from medssl.data.synth import draw_patient
from medssl.leakage.phash import hamming, phash, unit_view
from medssl.sample import ShardSample
from medssl.leakage.scan import compare, find_pairs, hash_folder

WINDOW = (40.0, 400.0)
TRANSFORMS = ("resize", "jpeg", "rotate", "crop", "brightness")


def transform(hu: np.ndarray, rng: np.random.Generator, which=TRANSFORMS,
              full: bool = False) -> np.ndarray:
    """A re-uploaded copy of an HU slice, float32 HU; ``full`` puts every strength at its max."""
    lo = WINDOW[0] - WINDOW[1] / 2
    x = hu.astype(np.float32)

    def draw(a: float, b: float) -> float:
        return b if full else float(rng.uniform(a, b))

    if "brightness" in which:
        x = lo + (x - lo) * (1 + draw(0, 0.1) * rng.choice((-1, 1)))
    if "rotate" in which:
        x = ndimage.rotate(x, draw(0, 5) * rng.choice((-1, 1)), reshape=False, order=1,
                           mode="nearest")
    if "crop" in which:
        h, w = x.shape
        ch, cw = round(h * draw(0, 0.1)), round(w * draw(0, 0.1))
        top, left = int(rng.integers(0, ch + 1)), int(rng.integers(0, cw + 1))
        x = x[top:h - ch + top, left:w - cw + left]
    if "resize" in which:
        scale = 0.5 if full else float(rng.uniform(0.5, 1.5))
        h, w = x.shape
        x = np.asarray(Image.fromarray(np.ascontiguousarray(x, dtype=np.float32), mode="F").resize(
            (max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BILINEAR))
    if "jpeg" in which:
        unit = np.clip((x - lo) / WINDOW[1], 0, 1)
        buf = io.BytesIO()
        Image.fromarray(np.rint(unit * 255).astype(np.uint8)).save(
            buf, "JPEG", quality=50 if full else int(rng.integers(50, 96)))
        x = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float32) / 255 * WINDOW[1] + lo
    return x.astype(np.float32)


def _sample(key: str, patient: str, hu: np.ndarray) -> dict:
    stored, offset, slope = encode_intensity(np.rint(hu).astype(np.int32)
                                             if hu.dtype.kind == "f" else hu)
    meta = {"modality": "CT", "patient": patient, "channels": 1,
            "intensity": {"offset": offset, "slope": slope, "unit": "HU"},
            "window": {"center": WINDOW[0], "width": WINDOW[1]}}
    return {"__key__": key, "img.png": encode_png(stored),
            "json": json.dumps(meta, sort_keys=True).encode()}


def write_folder(folder: Path, samples: list[dict], split: str, shard_size: int = 1000) -> None:
    """Shards in the documented format (``{split}-NNNNNN.tar`` + index.json)."""
    folder.mkdir(parents=True)
    shards = {}
    for n, start in enumerate(range(0, len(samples), shard_size)):
        name = f"{split}-{n:06d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False, mtime=0.0) as tw:
            for s in samples[start:start + shard_size]:
                tw.write(s)
        shards[name] = {"split": split, "samples": len(samples[start:start + shard_size]),
                        "sha256": file_sha256(folder / name)}
    index = {"format": FORMAT, "shards": shards,
             "splits": {split: {"samples": len(samples)}}}
    (folder / "index.json").write_text(json.dumps(index, indent=2))


def build(work: Path, seed: int, patients: int, task_patients: int, slices: int, size: int,
          copies: int) -> dict:
    """Write both folders; returns the injected (copy key -> source key) map and patients."""
    rng = np.random.default_rng([seed, 7])
    task, task_hu = [], {}
    for p in range(task_patients):
        ph = draw_patient(100_000 + p, seed=seed, slices=slices, size=size)
        for k in range(slices):
            key = f"t{seed}-{p:05d}-{k:02d}"
            task.append(_sample(key, f"p-task{p:05d}", ph.hu[k]))
            task_hu[key] = (ph.hu[k], f"p-task{p:05d}")
    pre = []
    for p in range(patients):
        ph = draw_patient(p, seed=seed, slices=slices, size=size)
        pre += [_sample(f"q{seed}-{p:05d}-{k:02d}", f"p-pre{p:05d}", ph.hu[k])
                for k in range(slices)]
    sources = rng.choice(sorted(task_hu), size=copies, replace=False)
    injected = {}
    for n, src in enumerate(sources):
        hu, patient = task_hu[src]
        key = f"c{seed}-{n:05d}"
        pre.append(_sample(key, f"p-copy{n:05d}", transform(hu, rng)))
        injected[key] = (str(src), patient)
    order = rng.permutation(len(pre))   # copies scattered among the shards
    write_folder(work / "pretrain", [pre[i] for i in order], "train")
    write_folder(work / "task", task, "test")
    return {"injected": injected, "task_hu": task_hu}


def score(pre, task, built: dict, pairs: tuple, radius: int) -> dict:
    """Recall on the copies, false positives among unrelated pairs, flagged task images.

    ``pairs`` is ``find_pairs``'s answer at the largest radius swept; this keeps those within
    ``radius``. Unrelated pairs: every cross pair but the copies' own and those of a copy with
    another slice of its source patient.
    """
    t_rows, p_rows, dist, _ = pairs
    keep = dist <= radius
    injected = built["injected"]
    task_patient = dict(zip(task.keys, task.patients))
    hits, flagged, fp, related = set(), set(), 0, 0
    for t, p in zip(t_rows[keep], p_rows[keep]):
        tk, pk = task.keys[t], pre.keys[p]
        source = injected.get(pk)
        if source is not None and source[0] == tk:
            hits.add(pk)
        elif source is not None and source[1] == task_patient[tk]:
            related += 1
        else:
            fp += 1
            flagged.add(tk)
    per_patient = {}
    for pt in task.patients:
        per_patient[pt] = per_patient.get(pt, 0) + 1
    n_related = sum(per_patient[pt] - 1 for _, pt in injected.values())
    unrelated = len(pre) * len(task) - len(injected) - n_related
    copy_patients = {pt for _, pt in injected.values()}
    clean = {k for k, pt in zip(task.keys, task.patients) if pt not in copy_patients}
    return {"radius": radius, "recall": len(hits) / len(injected), "hits": len(hits),
            "copies": len(injected), "fp_pairs": fp, "unrelated_pairs": unrelated,
            "fp_rate_pairs": fp / unrelated, "same_patient_pairs": related,
            "task_images_wrongly_flagged": len(flagged & clean) / max(1, len(clean))}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=625, help="pretraining patients")
    parser.add_argument("--task-patients", type=int, default=100)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    # Above the 0.95: a radius that only just reaches 0.95 on the calibration copies
    # fell to 0.92 on the held-out ones (sampling error on 200 and 50 copies).
    parser.add_argument("--target-recall", type=float, default=0.97)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out: dict = {"cpus": os.cpu_count(), "load": os.getloadavg()[0]}
    import faiss  # noqa: F401 - imported before the timed search
    with tempfile.TemporaryDirectory(prefix="medssl-leakage-bench-") as tmp:
        runs = {}
        for name, seed, copies in (("calibration", 1, 200), ("held_out", 2, 50)):
            work = Path(tmp) / name
            t0 = time.perf_counter()
            built = build(work, seed, args.patients, args.task_patients, args.slices,
                          args.size, copies)
            t1 = time.perf_counter()
            pre = hash_folder(work / "pretrain", desc=f"{name} pretrain")
            task = hash_folder(work / "task", desc=f"{name} task")
            t2 = time.perf_counter()
            compare(pre, task)   # the default radius, as `medssl leakage` runs it
            t3 = time.perf_counter()
            n_img = len(pre) + len(task)
            runs[name] = (built, pre, task)
            out[name] = {"pretrain_images": len(pre), "task_images": len(task),
                         "copies": copies, "build_s": round(t1 - t0, 1),
                         "hash_s_per_10k_images": round((t2 - t1) / n_img * 1e4, 2),
                         "search_s": round(t3 - t2, 3),
                         "search_s_per_1e8_pairs": round((t3 - t2) / (len(pre) * len(task))
                                                         * 1e8, 3)}
        built, pre, task = runs["calibration"]
        radii = range(20, 62, 2)
        pairs = find_pairs(pre, task, radii[-1])
        sweep = [score(pre, task, built, pairs, r) for r in radii]
        chosen = next((s["radius"] for s in sweep if s["recall"] >= args.target_recall), None)
        out["calibration"]["sweep"] = sweep
        out["calibration"]["chosen_radius"] = chosen
        built, pre, task = runs["held_out"]
        pairs = find_pairs(pre, task, radii[-1])
        held = [score(pre, task, built, pairs, r) for r in radii]
        out["held_out"]["sweep"] = held
        if chosen is not None:
            best = next(s for s in held if s["radius"] == chosen)
            best["recall_ci"] = wilson(best["hits"], best["copies"])
            out["held_out"]["at_chosen_radius"] = best
        # each transform alone at full strength, against the held-out task hashes
        rng = np.random.default_rng(3)
        keys = rng.choice(sorted(built["task_hu"]), size=100, replace=False)
        row = {k: i for i, k in enumerate(task.keys)}
        alone = {}
        for which in TRANSFORMS:
            d = [int(hamming(phash(unit_view(ShardSample(
                     "copy", transform(built["task_hu"][k][0], rng, (which,), full=True)[None],
                     window=WINDOW))),
                             task.hashes[row[k]])) for k in keys]
            alone[which] = {"median_bits": float(np.median(d)), "max_bits": int(np.max(d)),
                            "recall_at_chosen": None if chosen is None
                            else float(np.mean(np.asarray(d) <= chosen))}
        out["held_out"]["each_transform_at_full_strength"] = alone
    _print(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def _print(out: dict) -> None:
    print(f"# {out['cpus']} CPUs, load {out['load']:.1f}")
    for name in ("calibration", "held_out"):
        r = out[name]
        print(f"{name}: {r['pretrain_images']} pretraining images ({r['copies']} copies) x "
              f"{r['task_images']} task images; hash {r['hash_s_per_10k_images']} s per 10,000 "
              f"images; search {r['search_s']} s ({r['search_s_per_1e8_pairs']} s per 1e8 pairs)")
    print(f"chosen radius (calibration, recall >= target): {out['calibration']['chosen_radius']}")
    print("radius\tcal_recall\tcal_fp_rate\theld_recall\theld_fp_rate\theld_flagged_images")
    for c, h in zip(out["calibration"]["sweep"], out["held_out"]["sweep"]):
        print(f"{c['radius']}\t{c['recall']:.3f}\t{c['fp_rate_pairs']:.5f}\t{h['recall']:.3f}\t"
              f"{h['fp_rate_pairs']:.5f}\t{h['task_images_wrongly_flagged']:.3f}")
    best = out["held_out"].get("at_chosen_radius")
    if best:
        lo, hi = best["recall_ci"]
        print(f"held-out at radius {best['radius']}: recall {best['recall']:.3f} "
              f"(95% CI {lo:.3f}-{hi:.3f}, {best['hits']}/{best['copies']}), false positives "
              f"{100 * best['fp_rate_pairs']:.3f}% of {best['unrelated_pairs']} unrelated pairs, "
              f"{100 * best['task_images_wrongly_flagged']:.1f}% of clean task images flagged")
    for which, a in out["held_out"]["each_transform_at_full_strength"].items():
        print(f"  {which} alone at full strength: median {a['median_bits']} bits, max "
              f"{a['max_bits']}, recall at chosen radius {a['recall_at_chosen']}")


if __name__ == "__main__":
    main()
