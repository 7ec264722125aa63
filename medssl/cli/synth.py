"""``medssl synth OUT``: write the synthetic demo corpus (DICOM series + labels.csv)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "synth"
HELP = ("write the synthetic demo corpus: CT DICOM series with fake identifiers, and labels.csv "
        "(--volumes: volumes.csv, one label per series)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, metavar="OUT", help="folder to write (created; replaced if it "
                   "holds an earlier synthetic corpus)")
    p.add_argument("--patients", type=int, default=24, metavar="N", help="number of patients (default 24)")
    p.add_argument("--slices", type=int, default=None, metavar="K",
                   help="axial slices per patient (default 8; 24 with --volumes)")
    p.add_argument("--size", type=int, default=None, metavar="S",
                   help="slice side in pixels (default 128; 40 with --volumes)")
    p.add_argument("--volumes", action="store_true",
                   help="write whole series for `medssl shard --volumes` plus volumes.csv (one "
                        "label row per series: datasets/recipes/demo_volumes.yaml), no slice "
                        "labels or masks")
    p.add_argument("--seed", type=int, default=0, metavar="X",
                   help="random seed; the corpus is a pure function of the arguments (default 0)")


def run(args: argparse.Namespace) -> int:
    if args.volumes:
        from medssl.data.synth_volumes import DEFAULT_SIZE, DEFAULT_SLICES, write_volume_corpus

        write_volume_corpus(args.out, patients=args.patients, slices=args.slices or DEFAULT_SLICES,
                            size=args.size or DEFAULT_SIZE, seed=args.seed)
        return 0
    from medssl.data.synth import write_corpus

    write_corpus(args.out, patients=args.patients, slices=args.slices or 8,
                 size=args.size or 128, seed=args.seed)
    return 0
