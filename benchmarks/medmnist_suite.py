"""How long would the full MedMNIST benchmark suite take? Per task and protocol, per device.

Not a test: it times the suite's own code paths (finetune.preprocess / features / knn /
linear / full) on a sub-sample of synthetic images at each task's official split sizes and
channel count, and extrapolates:

- features: images/s of frozen extraction (resize + forward), times every image of a task,
  once per init;
- knn: seconds per (train x query) similarity-and-vote, scaled to each cell's subset size,
  the k candidates on val and the final test pass;
- linear: one LogisticRegression fit on ``--linear-rows`` rows of real-width features, per C,
  scaled linearly in rows (lbfgs costs ~ rows x dims x iterations; iterations vary, so this
  is an estimate, not a bound);
- finetune: train images/s (forward, backward, AdamW step) and eval images/s, times
  ``--epochs`` full epochs (an upper bound: early stopping usually ends sooner).

Cells = inits x label fractions x seeds, as in configs/finetune/medmnist.yaml.

A ``monai:<Net>`` arch (with ``--kwargs``, a JSON object) times the six 3-D MedMNIST tasks
instead: 28- or 64-voxel volumes (``--volume-size``) resized to ``--input-size``³, as
configs/finetune/medmnist3d.yaml runs them (one channel).

    python benchmarks/medmnist_suite.py --arch resnet18 --input-size 28 --sample 128
    python benchmarks/medmnist_suite.py --arch resnet50 --input-size 224 --device cuda --sample 1024
    python benchmarks/medmnist_suite.py --arch monai:ResNet --input-size 28 --sample 64 \
        --kwargs '{"block": "basic", "layers": [2, 2, 2, 2], "block_inplanes": [64, 128, 256, 512]}'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.config import MEDMNIST_2D, FinetuneConfig
from finetune.config3d import MEDMNIST_3D
from finetune.features import extract
from finetune.full import run_finetune
from finetune.inits import InitSource
from finetune.knn import knn_scores
from finetune.linear import run_linear
from finetune.preprocess import Preprocessor
from finetune.preprocess3d import VolumePreprocessor
from finetune.tasks import Split, TaskData
from medssl.volume_models import create_volume_backbone, is_volume_arch

log = logging.getLogger("medmnist_suite")


def synthetic_split(n: int, channels: int, n_classes: int, multilabel: bool, rng,
                    volume_size: int | None = None) -> Split:
    shape = (n, channels, *(volume_size,) * 3) if volume_size else (n, 28, 28, channels)
    imgs = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if multilabel:
        labels = (rng.random((n, n_classes)) < 0.2).astype(np.int64)
        labels[np.arange(n), np.arange(n) % n_classes] = 1
    else:
        labels = (np.arange(n) % n_classes).astype(np.int64)[:, None]
    return Split(images=imgs, labels=labels)


def measure(arch: str, input_size: int, device: torch.device, channels: int, sample: int,
            batch_size: int, linear_rows: int, n_classes: int = 8, kwargs: dict | None = None,
            volume_size: int | None = None) -> dict:
    """Per-unit costs on ``device`` for ``channels``-channel 28-px inputs (3-D: volumes of
    ``volume_size`` voxels a side)."""
    import timm

    rng = np.random.default_rng(0)
    if volume_size:
        source = InitSource("random", "random", channels, (0.0,) * channels, (1.0,) * channels, None,
                            make=lambda: create_volume_backbone(arch, channels, kwargs),
                            input_size=(input_size,) * 3, spatial_dims=3)
        prep = VolumePreprocessor(source)
    else:
        source = InitSource("random", "random", channels, (0.5,) * channels, (0.25,) * channels, None,
                            make=lambda: timm.create_model(arch, num_classes=0, in_chans=channels))
        prep = Preprocessor(source, input_size, "nearest")
    split = synthetic_split(sample, channels, n_classes, False, rng, volume_size)
    model = source.make().to(device)
    for _ in range(2):  # warm-up: allocator, cuDNN autotuning, lazy init
        extract(model, Split(split.images[:batch_size], split.labels[:batch_size]), prep, device, batch_size)
    sync(device)
    t0 = time.perf_counter()
    feats = extract(model, split, prep, device, batch_size)
    sync(device)
    eval_rate = sample / (time.perf_counter() - t0)

    # One fine-tuning epoch on `sample` images; val and test of 2 images keep evaluation
    # out of the timing (the epoch's evaluation cost is counted from eval_rate instead).
    tiny = synthetic_split(2, channels, n_classes, False, rng, volume_size)
    task = TaskData("bench", "multi-class", n_classes, channels, "medmnist",
                    {"train": split, "val": tiny, "test": tiny})
    cfg = FinetuneConfig(epochs=1, batch_size=batch_size, patience=1)
    sync(device)
    t0 = time.perf_counter()
    run_finetune(source.make, task, np.arange(sample), prep, cfg, device, 0, batch_size)
    sync(device)
    train_rate = sample / (time.perf_counter() - t0)

    # kNN on real-width features: time per train x query pair, at a size where the matrix
    # product dominates the per-call overhead.
    dim = feats.shape[1]
    bank = rng.normal(size=(8192, dim)).astype(np.float32)
    bank_y = (np.arange(len(bank)) % n_classes)[:, None]
    queries = rng.normal(size=(2048, dim)).astype(np.float32)
    t0 = time.perf_counter()
    knn_scores(bank, bank_y, queries, 20, 0.1, n_classes, False)
    knn_pair_s = (time.perf_counter() - t0) / (len(bank) * len(queries))

    # Linear probe: one fit per C on `linear_rows` rows (val/test of 500 rows each).
    fx = {s: rng.normal(size=(n, dim)).astype(np.float32) + 0.0 for s, n in
          (("train", linear_rows), ("val", 500), ("test", 500))}
    fy = {s: (np.arange(len(v)) % n_classes)[:, None] for s, v in fx.items()}
    fx["train"][np.arange(linear_rows), fy["train"][:, 0]] += 2.0  # learnable, so lbfgs iterates
    t0 = time.perf_counter()
    run_linear(fx, fy, np.arange(linear_rows), "multi-class", n_classes, [1.0], 1000, 0)
    linear_row_s = (time.perf_counter() - t0) / linear_rows
    return {"eval_img_s": eval_rate, "train_img_s": train_rate, "knn_pair_s": knn_pair_s,
            "linear_row_s": linear_row_s, "dim": dim}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def estimate(costs: dict[int, dict], inits: int, fractions: list[float], seeds: int, n_cs: int,
             n_ks: int, epochs: int, flags: tuple[str, ...] = MEDMNIST_2D) -> list[dict]:
    import medmnist

    rows = []
    for flag in flags:
        info = medmnist.INFO[flag]
        n = info["n_samples"]
        c = costs[int(info["n_channels"])]
        total_imgs = n["train"] + n["val"] + n["test"]
        features = inits * total_imgs / c["eval_img_s"]
        knn = linear = finetune = 0.0
        for f in fractions:
            n_tr = max(1, round(f * n["train"]))
            knn += (n_ks * n_tr * n["val"] + n_tr * n["test"]) * c["knn_pair_s"]
            linear += n_cs * n_tr * c["linear_row_s"]
            finetune += epochs * (n_tr / c["train_img_s"] + (n["val"] + n["test"]) / c["eval_img_s"])
        scale = inits * seeds
        rows.append({"task": flag, "n": n, "features_s": features, "knn_s": knn * scale,
                     "linear_s": linear * scale, "finetune_s": finetune * scale,
                     "total_s": features + (knn + linear + finetune) * scale})
    return rows


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--device", default="all", help="cpu, cuda, or all available")
    p.add_argument("--sample", type=int, default=128, help="images timed per measurement")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--linear-rows", type=int, default=2000)
    p.add_argument("--inits", type=int, default=3)
    p.add_argument("--fractions", default="0.01,0.1,1.0")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--cs", type=int, default=5, help="C values tried by the linear probe")
    p.add_argument("--ks", type=int, default=1, help="k values tried by kNN")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--kwargs", default="{}", help="3-D: monai.networks.nets.<Net> kwargs (JSON)")
    p.add_argument("--volume-size", type=int, default=28, help="3-D: MedMNIST file size (28 or 64)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d != "cuda" or torch.cuda.is_available()]
    fractions = [float(f) for f in args.fractions.split(",")]
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "devices": {}}
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if name == "cuda" else f"cpu x{torch.get_num_threads()} threads"
        volume = is_volume_arch(args.arch)
        costs = {ch: measure(args.arch, args.input_size, device, ch, args.sample, args.batch_size,
                             args.linear_rows, kwargs=json.loads(args.kwargs),
                             volume_size=args.volume_size if volume else None)
                 for ch in ((1,) if volume else (1, 3))}
        rows = estimate(costs, args.inits, fractions, args.seeds, args.cs, args.ks, args.epochs,
                        MEDMNIST_3D if volume else MEDMNIST_2D)
        unit = "volumes" if volume else "img"
        report["devices"][name] = {"device": label, "costs": costs, "tasks": rows}
        top = costs[max(costs)]
        print(f"\n{args.arch} @ {args.input_size} px on {label}: extraction {top['eval_img_s']:.1f} {unit}/s, "
              f"training {top['train_img_s']:.1f} {unit}/s ({'1-channel volumes' if volume else 'RGB'}); {args.inits} inits x "
              f"{len(fractions)} fractions x {args.seeds} seeds, {args.epochs} epochs max")
        print(f"| task | train/val/test | features | knn | linear | finetune | total |\n|{'---|' * 7}")
        for r in rows:
            n = r["n"]
            print(f"| {r['task']} | {n['train']}/{n['val']}/{n['test']} | {human(r['features_s'])} | "
                  f"{human(r['knn_s'])} | {human(r['linear_s'])} | {human(r['finetune_s'])} | {human(r['total_s'])} |")
        keys = ("features_s", "knn_s", "linear_s", "finetune_s", "total_s")
        sums = {k: sum(r[k] for r in rows) for k in keys}
        print(f"| **all {len(rows)}** | | " + " | ".join(human(sums[k]) for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
