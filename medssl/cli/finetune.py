"""``medssl finetune CONFIG.yaml [key=value ...]``: the benchmark suite, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path

from medssl.cli.help import config_keys_epilog

NAME = "finetune"
HELP = "benchmark SSL vs ImageNet vs random weights; re-run to complete unfinished cells"
PARSER_KWARGS = {"formatter_class": argparse.RawDescriptionHelpFormatter}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from finetune.config import FinetuneRunConfig

    p.add_argument("config", type=Path, metavar="CONFIG.yaml",
                   help="a YAML of overrides on the defaults below (e.g. configs/finetune/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides applied last, e.g. output_dir=runs/bench 'inits=[imagenet, random]'")
    p.epilog = config_keys_epilog(FinetuneRunConfig)


def run(args: argparse.Namespace) -> int:
    from finetune.runner import finetune_command

    return finetune_command(args.config, args.overrides)
