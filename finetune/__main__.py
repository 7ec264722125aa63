"""`python -m finetune ...` is `medssl finetune ...`."""

import sys

from medssl.cli import main

raise SystemExit(main(["finetune", *sys.argv[1:]]))
