"""``medssl leakage PRETRAIN_SHARDS TASK_SHARDS``: task images that pretraining saw (near-duplicates).

Exit status: 0 when no task image has a near-duplicate in the pretraining set under the rule,
1 when some do (the report lists the pairs by pseudonymous key), 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

NAME = "leakage"
HELP = ("find task images with a near-duplicate in a pretraining shard folder; writes "
        "leakage.json and leakage.md; exit 1 when any is found")

log = logging.getLogger(__name__)


def _splits(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give split names separated by commas, e.g. test,val")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pretrain", type=Path, metavar="PRETRAIN_SHARDS",
                   help="the shard folder pretraining read")
    p.add_argument("task", type=Path, metavar="TASK_SHARDS", help="the task's shard folder")
    p.add_argument("--out", type=Path, default=Path("leakage"), metavar="DIR",
                   help="folder for leakage.json and leakage.md (default ./leakage); an earlier "
                   "report there is replaced, anything else is refused")
    p.add_argument("--radius", type=int, default=None, metavar="R",
                   help="Hamming radius at or below which two hashes are one image (default: "
                   "the measured 42 of 256 bits)")
    p.add_argument("--bits", type=int, default=256, choices=(64, 256), help="hash length")
    p.add_argument("--splits", type=_splits, default=None, metavar="S1,S2",
                   help="task splits to check (default: test,val, those the folder has)")
    p.add_argument("--pretrain-splits", type=_splits, default=None, metavar="S1,S2",
                   help="pretraining splits to compare against (default: all; give the split "
                   "pretraining read, e.g. train, when both folders are one)")


def run(args: argparse.Namespace) -> int:
    from medssl.data.shards import read_index
    from medssl.errors import MedsslError
    from medssl.leakage import DEFAULT_RADIUS, find_leaks, write_report
    from medssl.leakage.patients import index_digest

    splits = args.splits
    if splits is None:
        present = {i.get("split") for i in read_index(args.task)["shards"].values()}
        splits = [s for s in ("test", "val") if s in present]
        if not splits:
            raise MedsslError(f"{args.task}: has no test or val split; name the splits to check "
                              "with --splits")
    if index_digest(args.pretrain) == index_digest(args.task):
        pre = set(args.pretrain_splits or
                  {i.get("split") for i in read_index(args.pretrain)["shards"].values()})
        same = sorted(pre & set(splits))
        if same:
            raise MedsslError(f"{args.task}: is the pretraining folder itself, and split(s) "
                              f"{same} would be compared with themselves; give --pretrain-splits "
                              "(the split pretraining read, e.g. train)")
    radius = DEFAULT_RADIUS if args.radius is None else args.radius
    result = find_leaks(args.pretrain, args.task, radius=radius, bits=args.bits,
                        task_splits=splits, pretrain_splits=args.pretrain_splits)
    _, md = write_report(result, args.out)
    matched, total = sum(result.matched.values()), sum(result.task_samples.values())
    print(f"leakage: {matched} of {total} task images ({'+'.join(splits)}) have a near-duplicate "
          f"among {result.pretrain_samples} pretraining images ({result.pairs_total} pairs at "
          f"Hamming <= {result.radius} of {result.bits} bits); report: {md}")
    return 1 if result.leaked else 0
