"""Training checkpoints in ``<output_dir>/checkpoints`` and the stop-on-signal flag.

Format (docs/internals.md): ``step_XXXXXXXX.pt`` holds a dict of tensors, numbers, strings and
plain containers only, so ``torch.load(..., weights_only=True)`` reads it. Its sha256 and size
go into the run record (``run.json``, medssl/rundir.py), which resume and publish check before
trusting the file; ``latest.txt`` names the newest and is replaced atomically after both.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import MedsslError
from medssl.io import sha256_file
from medssl.rundir import (
    CHECKPOINT_FORMAT,
    CheckpointEntry,
    RunRecord,
    add_checkpoint,
    write_record,
)

log = logging.getLogger(__name__)

LATEST = "latest.txt"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Path of the newest complete checkpoint, or None for a fresh run."""
    folder = checkpoint_dir(output_dir)
    marker = folder / LATEST
    if not marker.is_file():
        return None
    path = folder / marker.read_text().strip()
    if not path.is_file():
        raise MedsslError(f"{marker}: names {path.name}, which is missing; restore it or delete {marker}")
    return path


def save_checkpoint(output_dir: str | Path, state: dict[str, Any], keep: int,
                    record: RunRecord, rankme: float | None = None) -> CheckpointEntry:
    """Write ``state`` as ``step_XXXXXXXX.pt`` and record its sha256, then point ``latest.txt``
    at it and delete the recorded checkpoints past the newest ``keep`` (but the best-RankMe
    one; ``rankme`` is the latest evaluated at or before this step).

    Order matters for a crash at any point: the file is complete before it gets its name,
    ``run.json`` lists it before ``latest.txt`` names it, and an old file is deleted only
    after the record no longer lists it. The caller has checked the weights are finite.
    """
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(state['step']):08d}.pt"
    tmp = folder / (name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    entry = CheckpointEntry(file=name, step=int(state["step"]), sha256=sha256_file(tmp),
                            bytes=tmp.stat().st_size, weights_finite=True, rankme=rankme)
    os.replace(tmp, folder / name)
    dropped = add_checkpoint(record, entry, keep)
    write_record(output_dir, record)
    marker_tmp = folder / (LATEST + ".tmp")
    marker_tmp.write_text(name + "\n")
    os.replace(marker_tmp, folder / LATEST)
    for old in dropped:
        if old.file != name:
            (folder / old.file).unlink(missing_ok=True)
    return entry


def capture_rng(augment_generator: torch.Generator) -> dict[str, Any]:
    """Every RNG state as tensors and ints (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
        "augment": augment_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], augment_generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    augment_generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """SIGTERM / SIGUSR1 (Slurm's pre-emption warning) ask the loop to checkpoint and exit.

    The handler only sets a flag: the current step finishes, every rank agrees (all-reduce),
    a checkpoint is written and the command exits 75 (EX_TEMPFAIL: stopped early, resumable).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None
