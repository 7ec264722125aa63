"""``medssl pretrain CONFIG.yaml [key=value ...]``: self-supervised pretraining, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path

from medssl.cli.help import config_keys_epilog

NAME = "pretrain"
HELP = "self-supervised pretraining; re-run the same command to resume from output_dir"
PARSER_KWARGS = {"formatter_class": argparse.RawDescriptionHelpFormatter}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pretrain.config import PretrainConfig

    p.add_argument("config", type=Path, metavar="CONFIG.yaml",
                   help="a YAML of overrides on the defaults below (e.g. configs/pretrain/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides applied last, e.g. train.max_steps=100 data.shards=shards/ct")
    p.add_argument("--force-resume", action="store_true",
                   help="resume the run in output_dir although settings differ from its run.json "
                        "(the changes are recorded there); model.*, method.name and train.optimizer "
                        "cannot change")
    p.epilog = config_keys_epilog(PretrainConfig)


def run(args: argparse.Namespace) -> int:
    from pretrain.trainer import pretrain_command

    return pretrain_command(args.config, args.overrides, force_resume=args.force_resume)
