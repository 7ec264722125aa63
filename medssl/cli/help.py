"""Help text generated from a config tree: every key, its default and its one-line meaning.

The meanings are the dataclass fields' own comments (``medssl.config.describe``), so
``medssl pretrain --help`` and ``medssl finetune --help`` can never drift from the code.
"""

from __future__ import annotations

import json
import textwrap

from medssl.config import describe


def config_keys_epilog(cls: type) -> str:
    """An argparse epilog listing every key of ``cls`` as ``key = default  meaning``."""
    docs = describe(cls)
    width = max(len(d.key) for d in docs)
    lines = ["config keys (defaults; a YAML overrides them, then key=value):"]
    for d in docs:
        default = json.dumps(d.default) if not isinstance(d.default, str) else repr(d.default)
        head = f"  {d.key:<{width}} = {default}"
        meaning = textwrap.shorten(d.meaning, 200) if d.meaning else ""
        lines.append(f"{head}\n      {meaning}" if meaning else head)
    return "\n".join(lines)
