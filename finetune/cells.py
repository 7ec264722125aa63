"""The resumable store of finished cells: one (task, init, protocol, fraction, seed) each.

``cells.jsonl`` gets one JSON line per finished cell, appended and fsynced after the cell's
test scores (``predictions/<key>.npy``, written to a temporary name and renamed) are on disk,
so a crash leaves at worst a truncated last line, which is ignored and the cell redone.
A cell's key hashes everything that changes its meaning (task data, weights, architecture,
input recipe, protocol settings, fraction, seed): changing the config never silently reuses
an old result, and unrelated changes (device, batch size of feature extraction) keep them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.io import atomic_write_bytes
from medssl.results import CellRow, row_from_json, row_to_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellSpec:
    """What one cell runs: a protocol at a label fraction and seed, and its store ``key``."""

    protocol: str
    fraction: float
    seed: int
    key: str


def cell_key(**parts: object) -> str:
    """Stable 20-hex key of a cell from its defining parts (JSON-serialisable)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class CellStore:
    """Finished cells of one output dir: rows by key, plus each cell's test scores."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / "cells.jsonl"
        self.pred_dir = Path(out_dir) / "predictions"
        self.rows: dict[str, CellRow] = {}
        if self.path.is_file():
            self._drop_partial_line()
            for n, line in enumerate(self.path.read_text().splitlines(), start=1):
                try:
                    row = row_from_json(json.loads(line))
                except ValueError:  # JSONDecodeError, or a line pydantic cannot read as a row
                    log.warning("%s line %d is truncated (interrupted run); that cell will be redone", self.path, n)
                    continue
                if (self.pred_dir / f"{row.key}.npy").is_file():
                    self.rows[row.key] = row

    def _drop_partial_line(self) -> None:
        # A crash mid-append leaves a line without its newline; the next append would glue
        # onto it and corrupt a good row, so cut it off first.
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            log.warning("%s ends in a partial line (interrupted run); dropping it", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: CellRow, test_scores: np.ndarray) -> None:
        """Persist a finished cell: scores first, then its line (the line is the commit)."""
        import io

        self.pred_dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, np.asarray(test_scores, dtype=np.float64), allow_pickle=False)
        atomic_write_bytes(self.pred_dir / f"{row.key}.npy", buf.getvalue())
        with open(self.path, "a") as f:
            f.write(json.dumps(row_to_json(row), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[row.key] = row

    def scores(self, key: str) -> np.ndarray:
        return np.load(self.pred_dir / f"{key}.npy", allow_pickle=False)
