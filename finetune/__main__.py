"""``python -m finetune ...`` is ``medssl finetune ...``.

A launcher shim, not stage code: it sits above the app layer like the ``medssl`` script does,
which is why the layering test (tests/test_layers.py) lets ``__main__`` modules import it.
"""

import sys

from medssl.cli import main

raise SystemExit(main(["finetune", *sys.argv[1:]]))
