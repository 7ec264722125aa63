"""``python -m medssl ...`` is ``medssl ...``."""

from medssl.cli import main

raise SystemExit(main())
