"""File helpers every stage shares: a file's sha256, and writes that never leave half a file.

An atomic write goes to ``<name>.tmp`` beside the target and is renamed over it, so a reader
(or a resumed run) sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str, fsync: bool = False) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    """JSON (no NaN: ``allow_nan=False`` makes a NaN a bug, not a silent non-standard file)."""
    atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")
