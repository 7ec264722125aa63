"""``medssl publish RUN_DIR --out DIR``: timm-loadable (2-D) or MONAI-loadable (3-D) weights and a model card."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "publish"
HELP = "turn a pretraining run dir into timm-loadable (2-D) or MONAI-loadable (3-D) weights and a model card"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the output_dir of `medssl pretrain`")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="published dir to write: new, empty, or an earlier publish (replaced)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hugging Face repo "
                   "(org/name); needs a token and network")
    p.add_argument("--results", type=Path, metavar="RESULTS_JSON",
                   help="a `medssl finetune` results.json whose table goes into the card")
    p.add_argument("--checkpoint", default="latest", metavar="latest|best-rankme|STEP",
                   help="which checkpoint: the newest (default), the highest RankMe on the val batch "
                   "(needs train.eval_every), or a step")


def run(args: argparse.Namespace) -> int:
    from medssl.publish import publish_command

    return publish_command(args.run_dir, args.out, push_to_hub=args.push_to_hub, results=args.results,
                          checkpoint=args.checkpoint)
