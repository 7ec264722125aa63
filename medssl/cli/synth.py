"""``medssl synth OUT``: write the synthetic demo corpus (DICOM series + labels.csv)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "synth"
HELP = "write the synthetic demo corpus: CT DICOM series with fake identifiers, and labels.csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, metavar="OUT", help="folder to write (created; replaced if it "
                   "holds an earlier synthetic corpus)")
    p.add_argument("--patients", type=int, default=24, metavar="N", help="number of patients (default 24)")
    p.add_argument("--slices", type=int, default=8, metavar="K", help="axial slices per patient (default 8)")
    p.add_argument("--size", type=int, default=128, metavar="S", help="slice side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, metavar="X",
                   help="random seed; the corpus is a pure function of the arguments (default 0)")


def run(args: argparse.Namespace) -> int:
    from medssl.data.synth import write_corpus

    write_corpus(args.out, patients=args.patients, slices=args.slices, size=args.size, seed=args.seed)
    return 0
