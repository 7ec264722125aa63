"""The ``medssl`` command: the app layer, above the stages.

One module per command (``synth``, ``shard``, ``shards``, ``pretrain``, ``publish``,
``finetune``, ``explain``, ``leakage``, ``demo``), each giving ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> exit code``. This package is the only part of ``medssl`` that imports a stage
(``pretrain``, ``finetune``), and nothing imports it (``tests/test_layers.py`` reads the
imports to keep it so). Each command imports its stage lazily, so ``medssl shards verify``
does not pay for torch's import, and a MedsslError becomes one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medssl import __version__
from medssl.cli import demo, explain, finetune, leakage, pretrain, publish, shard, shards, synth
from medssl.errors import MedsslError
from medssl.logging import setup_logging

log = logging.getLogger("medssl")

COMMANDS = (synth, shard, shards, pretrain, publish, finetune, explain, leakage, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medssl",
        description="Self-supervised pretraining on medical scans, and benchmarks of its weights.",
    )
    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP,
                           **getattr(command, "PARSER_KWARGS", {}))
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command, return its exit code (2 for a user error)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.run(args)
    except MedsslError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
