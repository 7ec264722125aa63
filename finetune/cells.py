"""The resumable store of finished cells: one (task, init, protocol, fraction, seed) each.

``cells.jsonl`` gets one JSON line per finished cell, appended and fsynced after the cell's
test scores (``predictions/<key>.npy``) and the validation scores of the same model
(``predictions/<key>.val.npy``, what temperatures and thresholds are fitted on) are on disk,
each written to a temporary name and renamed, so a crash leaves at worst a truncated last line,
which is ignored and the cell redone. A cell finished before validation scores were kept has no
``.val.npy``; it is redone (with the same key) rather than reported without calibration.
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
    #: Site-shift fold, ``"{attribute}={held-out value}"``; None for the in-distribution grid.
    fold: str | None = None


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
        stale = 0
        if self.path.is_file():
            self._drop_partial_line()
            for n, line in enumerate(self.path.read_text().splitlines(), start=1):
                try:
                    row = row_from_json(json.loads(line))
                except ValueError:  # JSONDecodeError, or a line pydantic cannot read as a row
                    log.warning("%s line %d is truncated (interrupted run); that cell will be redone", self.path, n)
                    continue
                if not (self.pred_dir / f"{row.key}.npy").is_file():
                    continue
                if (self.pred_dir / f"{row.key}.val.npy").is_file():
                    self.rows[row.key] = row
                elif row.key not in self.rows:
                    stale += 1
        if stale:
            log.warning("%s: %d finished cells have no validation scores (written before calibration "
                        "and thresholds needed them); they will be redone", self.path, stale)

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

    def add(self, row: CellRow, test_scores: np.ndarray, val_scores: np.ndarray) -> None:
        """Persist a finished cell: test scores ``[N_test, C]`` and the same model's validation
        scores ``[N_val, C]`` first, then its line (the line is the commit)."""
        self.pred_dir.mkdir(parents=True, exist_ok=True)
        _save(self.pred_dir / f"{row.key}.val.npy", val_scores)
        _save(self.pred_dir / f"{row.key}.npy", test_scores)
        with open(self.path, "a") as f:
            f.write(json.dumps(row_to_json(row), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[row.key] = row

    def scores(self, key: str) -> np.ndarray:
        """Test scores ``[N_test, C]`` of a finished cell."""
        return np.load(self.pred_dir / f"{key}.npy", allow_pickle=False)

    def val_scores(self, key: str) -> np.ndarray:
        """Validation scores of a finished cell's chosen model: ``[N_val, C]``, or for a
        site-shift cell ``[N_fold_val, C]`` on the fold's validation images (fold order)."""
        return np.load(self.pred_dir / f"{key}.val.npy", allow_pickle=False)


def _save(path: Path, scores: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(scores, dtype=np.float64), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
