"""`python -m pretrain ...` is `medssl pretrain ...`."""

import sys

from medssl.cli import main

raise SystemExit(main(["pretrain", *sys.argv[1:]]))
