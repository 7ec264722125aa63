"""``medssl shards verify DIR``: re-check a shard folder against its index.json."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "shards"
HELP = "shard folder tools"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="shards_command", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="recompute checksums and counts, check members and "
                       "patient-disjoint splits; exit 1 listing every problem")
    v.add_argument("dir", type=Path, metavar="DIR", help="a folder written by `medssl shard`")


def run(args: argparse.Namespace) -> int:
    from medssl.data.verify import verify_command

    return verify_command(args.dir)
