"""``medssl explain BENCHMARK_DIR``: class-activation maps with sanity checks for a benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "explain"
HELP = ("draw class-activation maps (Grad-CAM, attention rollout) of a finished benchmark's "
        "models, with model- and data-randomisation sanity checks, into BENCHMARK_DIR/explain/")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bench", type=Path, metavar="BENCHMARK_DIR",
                   help="the output_dir of `medssl finetune` (its config.yaml and finished cells)")
    p.add_argument("--init", action="append", default=None, metavar="INIT",
                   help="explain only this init (as in the config: ssl:DIR, imagenet, random); "
                   "repeatable; default: every init")
    p.add_argument("--protocol", choices=("linear", "finetune"), default="linear",
                   help="explain the linear probe on frozen features (default) or the "
                   "fine-tuned network (trained once more with the cell's seed)")
    p.add_argument("--method", choices=("gradcam", "rollout"), default="gradcam",
                   help="Grad-CAM (CNNs and ViTs, default) or attention rollout (ViTs)")
    p.add_argument("--n-per-class", type=int, default=4, metavar="N",
                   help="test images per class in each grid (default 4)")
    p.add_argument("--targets", choices=("pred", "true"), default="pred",
                   help="the class each map explains (default: the predicted one)")
    p.add_argument("--fraction", type=float, default=None,
                   help="label fraction of the explained cell (default: the largest)")
    p.add_argument("--seed", type=int, default=None, help="seed of the explained cell (default: the first)")
    p.add_argument("--data-randomisation", choices=("auto", "yes", "no"), default="auto",
                   help="also fit a model on permuted labels (auto: for the linear probe only, "
                   "where it is one refit)")
    p.add_argument("--masks", type=Path, default=None, metavar="PATH",
                   help="finding masks by shard sample key (.npz) or boxes (.csv) for the "
                   "localisation score")


def run(args: argparse.Namespace) -> int:
    from finetune.explain_command import explain_benchmark, summary
    from finetune.explain_config import ExplainConfig

    ecfg = ExplainConfig(n_per_class=args.n_per_class, protocol=args.protocol, method=args.method,
                         targets=args.targets, fraction=args.fraction, seed=args.seed,
                         data_randomisation={"auto": None, "yes": True, "no": False}[
                             args.data_randomisation],
                         masks=str(args.masks) if args.masks else None)
    out = explain_benchmark(args.bench, ecfg, args.init)
    print(f"{summary(out)}; see {args.bench / 'explain' / 'explanations.md'}")
    return 0
