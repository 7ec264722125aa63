"""The ``medssl`` command: one entry point, one subcommand per stage.

Each subcommand imports its stage lazily, so ``medssl shards verify`` does not pay for torch's
import, and turns a MedsslError into a single clear line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medssl import __version__
from medssl.data.budget import DEFAULT_MAX_PIXELS
from medssl.data.report import DEFAULT_MAX_BAD
from medssl.errors import MedsslError
from medssl.logging import setup_logging

log = logging.getLogger("medssl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medssl",
        description="Self-supervised pretraining on medical scans, and benchmarks of its weights.",
    )
    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the synthetic demo corpus (DICOM series + labels.csv)")
    p.add_argument("out", type=Path)
    p.add_argument("--patients", type=int, default=24)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="slice side in pixels")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("shard", help="de-identify scans and write patient-split WebDataset shards")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipe", type=Path, help="datasets/recipes/NAME.yaml for labeled data")
    p.add_argument("--splits", default="train=0.8,val=0.1,test=0.1")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--salt-file", type=Path, help="secret for pseudonyms (default: env MEDSSL_SALT, "
                   "else <out>.salt beside the shard folder, created once)")
    p.add_argument("--max-side", type=int, default=512, help="resize larger images (px)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--report", type=Path, help="per-input JSONL report (default <out>.report.jsonl)")
    p.add_argument("--max-bad", type=float, default=DEFAULT_MAX_BAD,
                   help="fail (exit 1) when more than this fraction of the inputs is lost "
                   "(quarantined; rows a recipe's label policy drops on purpose do not count); "
                   f"default {DEFAULT_MAX_BAD}. A run that writes no sample always fails")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="memory budget of one decode, in pixel values: a DICOM frame or image "
                   "page (rows x columns x samples), a whole NIfTI volume (voxels); values "
                   "over 16 bits count once per 16 bits. Larger files are quarantined as "
                   f"too_large from their header, before decoding. Default {DEFAULT_MAX_PIXELS} "
                   "keeps a worker under 1 GB (docs/internals.md)")
    p.add_argument("--allow-burned-in", action="store_true",
                   help="keep images flagged BurnedInAnnotation=YES and secondary captures")
    p.add_argument("--axis", choices=["axial", "coronal", "sagittal"], default="axial",
                   help="anatomical axis NIfTI volumes are sliced along")

    p = sub.add_parser("shards", help="shard folder tools")
    shard_sub = p.add_subparsers(dest="shards_command", required=True, metavar="ACTION")
    v = shard_sub.add_parser("verify", help="recompute checksums and counts, check patient-disjoint splits")
    v.add_argument("dir", type=Path)

    p = sub.add_parser("pretrain", help="self-supervised pretraining; resumes from output_dir")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--force-resume", action="store_true",
                   help="resume the run in output_dir although settings differ from its run.json "
                        "(the changes are recorded there); model.*, method.name and train.optimizer "
                        "cannot change")

    p = sub.add_parser("publish", help="turn a run dir into timm-loadable weights and a model card")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--push-to-hub", metavar="REPO")
    p.add_argument("--results", type=Path, help="a finetune results.json to put in the card")

    p = sub.add_parser("finetune", help="benchmark SSL vs ImageNet vs random weights")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = sub.add_parser("demo", help="the whole product on the synthetic corpus, on a CPU")
    p.add_argument("--out", type=Path, default=Path("medssl-demo"))
    return parser


def run(args: argparse.Namespace) -> int:
    """Dispatch to the stage; returns the process exit code."""
    if args.command == "synth":
        from medssl.data.synth import write_corpus

        write_corpus(args.out, patients=args.patients, slices=args.slices, size=args.size, seed=args.seed)
        return 0
    if args.command == "shard":
        from medssl.data.shard import shard_command

        return shard_command(args)
    if args.command == "shards":
        from medssl.data.verify import verify_command

        return verify_command(args.dir)
    if args.command == "pretrain":
        from pretrain.trainer import pretrain_command

        return pretrain_command(args.config, args.overrides, force_resume=args.force_resume)
    if args.command == "publish":
        from medssl.publish import publish_command

        return publish_command(args.run_dir, args.out, push_to_hub=args.push_to_hub, results=args.results)
    if args.command == "finetune":
        from finetune.runner import finetune_command

        return finetune_command(args.config, args.overrides)
    if args.command == "demo":
        from medssl.demo import run_demo

        return run_demo(args.out)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return run(args)
    except MedsslError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
