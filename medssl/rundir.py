"""The run record ``<run dir>/run.json``: what one pretraining run is, read and written here only.

A run dir belongs to a run when it holds this record (format ``medssl-run/1``). The trainer
writes it (atomically: a temporary file, then ``os.replace``) when a run starts or resumes and
after every checkpoint; resume reads it to check that the command is the same run and that a
checkpoint is intact; ``medssl publish`` reads it to verify the checkpoint it publishes.
``config.yaml`` stays the human-readable copy of the config, but this record is the authority.

Schema (docs/internals.md, "Run record"): ``RunRecord`` below, a tree of typed dataclasses
stored as plain JSON and read back through ``medssl.config.build``, so every key and type is
checked on the way in.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.config import build, to_dict
from medssl.errors import ConfigError, MedsslError
from medssl.io import sha256_file
from medssl.lock import LOCK_NAME

FORMAT = "medssl-run/1"
#: Format tag inside each training checkpoint (``checkpoints/step_XXXXXXXX.pt``).
CHECKPOINT_FORMAT = "medssl-ckpt/1"
RECORD_NAME = "run.json"
CHECKPOINTS = "checkpoints"
#: Files a run dir may hold before its record exists: the lock of the command creating it.
LOCK_FILES = (LOCK_NAME, LOCK_NAME + ".held")
#: Stands for a key one config has and the other lacks, in ``config_diff``.
ABSENT = "<absent>"


@dataclass
class ShardSource:
    """One shard folder a run read: ``samples`` in ``shards`` files of ``split``."""

    folder: str                   # absolute path of the folder holding the shards
    split: str | None             # the split read (several joined by "+"; None without index.json)
    index_sha256: str | None      # sha256 of the folder's index.json bytes; None without one
    salt_id: str | None           # index.json config.salt_id: which pseudonym salt made the keys
    shards: int
    samples: int
    from_step: int = 0            # first step that read it; a forced data change starts a new set


@dataclass
class CheckpointEntry:
    """A checkpoint file in ``checkpoints/`` as written: its digest is checked on every load."""

    file: str                     # name inside checkpoints/, e.g. step_00000100.pt
    step: int
    sha256: str
    bytes: int
    weights_finite: bool | None   # every float tensor of the model finite; None = not checked
    rankme: float | None = None   # the latest RankMe at or before this step (train.eval_every)


@dataclass
class ForcedResume:
    """A resume allowed by ``--force-resume`` although settings differed from the record."""

    step: int                                   # the step resumed from
    changed: dict[str, list[Any]] = field(default_factory=dict)  # dotted key -> [recorded, new]


@dataclass
class Start:
    """One start of the command on this run dir (a fresh start, a resume, an adoption)."""

    step: int
    world_size: int
    medssl_version: str
    git_sha: str
    adopted: bool = False         # the run dir predates run.json and was adopted at this start


@dataclass
class Intensity:
    """How stored pixel values become network input, and what the shards held."""

    pipeline: str                 # the transform, in words (pretrain/augment.py)
    mean: list[float]             # normalisation after windowing to [0, 1], per channel
    std: list[float]
    window_jitter: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None   # most common modality of the first samples
    unit: str | None = None
    window: dict[str, Any] | None = None   # most common default window {center, width}


@dataclass
class RunRecord:
    """Everything that identifies a run and its checkpoints (``run.json``)."""

    medssl_version: str           # of the latest start (who wrote the newest checkpoints)
    git_sha: str
    method: str
    arch: str                     # timm model name of the backbone
    in_chans: int
    input_size: int               # side in px of the network input (augment.crop_size)
    model_kwargs: dict[str, Any]  # extra timm.create_model kwargs
    intensity: Intensity
    config: dict[str, Any]        # the resolved config of the latest start (dotted keys compared)
    data: list[ShardSource] = field(default_factory=list)
    checkpoints: list[CheckpointEntry] = field(default_factory=list)   # oldest first
    forced_resumes: list[ForcedResume] = field(default_factory=list)
    starts: list[Start] = field(default_factory=list)
    #: What the latest start derived from the config: peak_lr, precision, world_size, local_batch.
    resolved: dict[str, Any] = field(default_factory=dict)
    #: The backbone's weights at step 0 in words (pretrain/init.py); None in older records.
    started_from: str | None = None
    format: str = FORMAT

    def latest_sources(self) -> list[ShardSource]:
        """The shard folders read since the latest forced data change (all, if none)."""
        if not self.data:
            return []
        last = max(s.from_step for s in self.data)
        return [s for s in self.data if s.from_step == last]

    def entry(self, file: str) -> CheckpointEntry | None:
        return next((e for e in self.checkpoints if e.file == file), None)


# --- reading and writing -------------------------------------------------------------------


def record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECORD_NAME


def read_record(run_dir: str | Path) -> RunRecord | None:
    """The run record of ``run_dir``, or None when it has none; MedsslError when damaged."""
    path = record_path(run_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedsslError(f"{path}: the run record is unreadable ({exc}); restore it from a "
                          "backup, or use another output_dir") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise MedsslError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    try:
        return build(RunRecord, data, where=str(path))
    except ConfigError as exc:
        raise MedsslError(f"{exc} (the run record is damaged)") from None


def write_record(run_dir: str | Path, record: RunRecord) -> Path:
    """Write ``record`` atomically (a reader sees the old record or the new one, never half)."""
    path = record_path(run_dir)
    text = json.dumps(_finite_or_none(to_dict(record)), indent=1, allow_nan=False) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN; a non-finite number in provenance (a shard's window) is recorded as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


# --- what a folder is ----------------------------------------------------------------------


def dir_kind(run_dir: str | Path) -> str:
    """``"new"`` (absent, or empty but for a lock file), ``"run"`` (holds run.json),
    ``"legacy"`` (a medssl run dir from before run.json: config.yaml and
    checkpoints/latest.txt), or ``"foreign"`` (anything else). Reads only."""
    folder = Path(run_dir)
    if not folder.exists():
        return "new"
    if not folder.is_dir():
        return "foreign"
    names = {p.name for p in folder.iterdir()} - set(LOCK_FILES)
    if not names:
        return "new"
    if RECORD_NAME in names:
        return "run"
    if "config.yaml" in names and (folder / CHECKPOINTS / "latest.txt").is_file():
        return "legacy"
    return "foreign"


def dir_listing(run_dir: str | Path, limit: int = 3) -> str:
    """A few names of what ``run_dir`` holds, for a refusal message."""
    names = sorted(p.name for p in Path(run_dir).iterdir() if p.name not in LOCK_FILES)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --- comparing configs ---------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.3}}`` -> ``{"train.lr": 0.3}``; lists stay whole values, and an
    empty mapping contributes no key (``model.kwargs: {}`` equals no kwargs)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_diff(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ, ``{key: (recorded, current)}``; ``ABSENT`` for a missing side.

    Both sides pass through JSON first, so a tuple equals the list the record holds.
    """
    old = flatten(json.loads(json.dumps(recorded)))
    new = flatten(json.loads(json.dumps(current)))
    return {k: (old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, ABSENT) != new.get(k, ABSENT)}


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``a.b=1 -> 2, c='x' -> 'y'`` for a one-line message."""
    def show(v: Any) -> str:
        return v if v is ABSENT else repr(v)

    return ", ".join(f"{k}={show(a)} -> {show(b)}" for k, (a, b) in changes.items())


# --- checkpoints ---------------------------------------------------------------------------


def checkpoint_problem(run_dir: str | Path, entry: CheckpointEntry) -> str | None:
    """Why the checkpoint of ``entry`` cannot be trusted, or None when it is intact."""
    path = Path(run_dir) / CHECKPOINTS / entry.file
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry.bytes:
        return f"{size} bytes, {RECORD_NAME} says {entry.bytes}"
    if sha256_file(path) != entry.sha256:
        return f"sha256 differs from {RECORD_NAME}"
    if entry.weights_finite is False:
        return "non-finite weights"
    return None


def newest_intact(run_dir: str | Path, record: RunRecord,
                  ) -> tuple[CheckpointEntry | None, list[tuple[CheckpointEntry, str]]]:
    """The newest intact recorded checkpoint, and the newer ones passed over with the reason."""
    damaged: list[tuple[CheckpointEntry, str]] = []
    for entry in sorted(record.checkpoints, key=lambda e: e.step, reverse=True):
        problem = checkpoint_problem(run_dir, entry)
        if problem is None:
            return entry, damaged
        damaged.append((entry, problem))
    return None, damaged


def add_checkpoint(record: RunRecord, entry: CheckpointEntry, keep: int) -> list[CheckpointEntry]:
    """Record ``entry`` (replacing one of the same file) and return the entries past ``keep``,
    oldest first, now dropped from the record (the caller deletes their files)."""
    kept = [e for e in record.checkpoints if e.file != entry.file and e.step < entry.step]
    record.checkpoints = [*kept, entry]
    best = best_rankme(record.checkpoints)
    # The best-RankMe checkpoint outlives the rotation: it is the one a label-free choice publishes.
    dropped = [e for e in record.checkpoints[:-keep] if e is not best]
    record.checkpoints = [e for e in record.checkpoints if not any(e is d for d in dropped)]
    return dropped


def best_rankme(entries: Iterable[CheckpointEntry]) -> CheckpointEntry | None:
    """The entry with the highest recorded RankMe (the later on a tie); None if none has one."""
    scored = [e for e in entries if e.rankme is not None]
    return max(scored, key=lambda e: (e.rankme, e.step)) if scored else None


def nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` holding a NaN or an infinity."""
    import torch

    return [name for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def source_summary(sources: Iterable[ShardSource]) -> str:
    """``/data/shards (train, index 1a2b3c4d)`` for messages."""
    return "; ".join(f"{s.folder} ({s.split}, index {(s.index_sha256 or 'none')[:12]})" for s in sources)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, read weights-only (never unpickled); MedsslError naming the file
    when it is unreadable or not a medssl checkpoint. Read by resume and by publish."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or not weights-only: refuse, never unpickle
        raise MedsslError(f"{path}: cannot load as a weights-only checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MedsslError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


def backbone_state(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """The timm backbone's state dict inside a checkpoint: keys with its ``backbone_prefix``."""
    prefix = ckpt.get("backbone_prefix", "backbone.")
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise MedsslError(f"{path}: no keys start with backbone_prefix {prefix!r}")
    return state
