"""Which run a ``medssl pretrain`` command continues, decided before it writes anything.

``output_dir`` is one of (``medssl.rundir.dir_kind``):

- absent, or empty but for a lock file: a new run;
- holding ``run.json``: this run, resumed, if the resolved config equals the recorded one but
  for the keys in ``RESUME_SAFE``, and the shard folders are the recorded ones (same
  index.json digest); otherwise refused, naming every differing key as ``key=old -> new``.
  ``--force-resume`` accepts the differences (but never those in ``NEVER_FORCED``) and
  records them in run.json;
- a run dir from before run.json (``config.yaml`` and ``checkpoints/latest.txt``): adopted
  when the config stored in its latest checkpoint passes the same comparison;
- anything else: refused, and left byte-identical (not even a lock file is created).

The checks run once before taking the run dir's lock (so a refusal touches nothing), then
again under the lock if the run dir changed meanwhile. The checkpoint to resume is the newest
whose size and sha256 match run.json; a damaged newer one is named in a warning.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.config import to_dict
from medssl.errors import ConfigError, MedsslError
from medssl.lock import FolderLock
from medssl.rundir import (
    ABSENT,
    CHECKPOINTS,
    RECORD_NAME,
    CheckpointEntry,
    ForcedResume,
    Intensity,
    RunRecord,
    Start,
    config_diff,
    dir_kind,
    dir_listing,
    flatten,
    format_changes,
    newest_intact,
    nonfinite_tensors,
    read_record,
    record_path,
    sha256_file,
    source_summary,
)
from pretrain.config import PretrainConfig
from pretrain.shardcheck import ShardReport, check_shards, read_cache, warn_if_batch_exceeds
from pretrain.volumes import crop_size

log = logging.getLogger(__name__)

#: Keys a resume may change silently. Each changes how the run is executed, logged, kept or
#: stopped, never what is learned from which data: the run's length (``max_steps``: the cosine
#: schedule stretches to the new end), checkpoint and log cadence, the stopping policy for
#: non-finite steps and bad samples, the loader's parallelism (``num_workers`` changes the
#: sample order, which the trainer warns about), memory layout and compilation, tracking,
#: the shard check's depth, test hooks, and the folder itself (a run dir may be moved).
#: ``train.eval_every`` only measures (pretrain/monitor.py); ``train.eval_samples`` is not
#: safe: RankMe over another batch is not comparable with the recorded ones.
RESUME_SAFE = (
    "output_dir",
    "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.max_nonfinite_steps", "train.compile", "train.channels_last", "train.eval_every",
    "data.num_workers", "data.prefetch_factor", "data.pin_memory", "data.max_bad_samples",
    "data.verify",
    "logging.*", "debug.*",
)
#: Keys even ``--force-resume`` cannot change: the checkpoint's tensors would not fit.
NEVER_FORCED = ("model.*", "method.name", "train.optimizer")


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


@dataclass
class RunPlan:
    """What this command will do with ``output_dir``; held by rank zero."""

    kind: str                                  # new | run | legacy
    record: RunRecord | None                   # the record found (None: new or legacy)
    resume: CheckpointEntry | None = None      # the checkpoint to load (None: step 0)
    start: int = 0
    finished: bool = False
    forced: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    report: ShardReport | None = None
    legacy: dict[str, Any] | None = None       # the loaded latest checkpoint of a legacy dir
    adopted: list[CheckpointEntry] = field(default_factory=list)   # a legacy dir's checkpoints
    lock: FolderLock | None = None


@dataclass
class _State:
    kind: str
    record: RunRecord | None
    raw: bytes | None                          # run.json as read, to notice a change
    legacy: dict[str, Any] | None = None
    legacy_file: str | None = None


def plan_run(cfg: PretrainConfig, urls: list[str], force_resume: bool) -> RunPlan:
    """Decide new / resume / refuse for ``cfg.output_dir``, then lock it. Rank zero only.

    Raises MedsslError (one line) on refusal; the caller releases ``plan.lock`` at the end.
    """
    out = Path(cfg.output_dir)
    state = _look(out)
    forced = _compare_config(cfg, state, force_resume)
    newest = max((e.step for e in state.record.checkpoints), default=0) if state.record else 0
    if state.legacy is not None:
        newest = int(state.legacy.get("step", 0))
    report = None
    if newest < cfg.train.max_steps:           # a finished run needs no data
        report = _check_data(cfg, urls, out, state)
        forced.update(_compare_data(state, report, force_resume, newest))

    lock = FolderLock(out, "run dir").acquire()
    try:
        if _changed(out, state):                  # another command wrote it while we checked
            state = _look(out)
            forced = _compare_config(cfg, state, force_resume)
        plan = RunPlan(kind=state.kind, record=state.record, forced=forced, legacy=state.legacy,
                       lock=lock)
        if state.record is not None:
            plan.resume = _intact_checkpoint(out, state.record)
            plan.start = plan.resume.step if plan.resume else 0
        elif state.legacy is not None:
            plan.adopted = _adopt(out, state)
            plan.resume = plan.adopted[-1]
            plan.start = plan.resume.step
        plan.finished = plan.start >= cfg.train.max_steps
        if not plan.finished:
            plan.report = report or _check_data(cfg, urls, out, state)
            plan.forced.update(_compare_data(state, plan.report, force_resume, plan.start))
            warn_if_batch_exceeds(cfg.train.batch_size, plan.report, cfg.data.split)
    except BaseException:
        lock.release()
        raise
    if plan.forced:
        log.warning("--force-resume: continuing %s with changed settings: %s (recorded in %s)",
                    out, format_changes(plan.forced), RECORD_NAME)
    return plan


def _changed(out: Path, state: _State) -> bool:
    kind = dir_kind(out)
    if kind != state.kind:
        return True
    return kind == "run" and record_path(out).read_bytes() != state.raw


def _look(out: Path) -> _State:
    kind = dir_kind(out)
    if kind == "foreign":
        what = "is a file" if out.exists() and not out.is_dir() else f"holds {dir_listing(out)}"
        raise MedsslError(f"{out}: output_dir is not a medssl run dir (it {what}, and no {RECORD_NAME}); "
                          "refusing to write into it: choose a new or empty output_dir")
    if kind == "run":
        raw = record_path(out).read_bytes()
        return _State(kind, read_record(out), raw)
    if kind == "legacy":
        ckpt, name = _load_legacy(out)
        return _State(kind, None, None, ckpt, name)
    return _State(kind, None, None)


def _load_legacy(out: Path) -> tuple[dict[str, Any], str]:
    from medssl.rundir import load_checkpoint
    from pretrain.checkpoint import latest_checkpoint

    try:
        path = latest_checkpoint(out)
        assert path is not None
        ckpt = load_checkpoint(path)
    except MedsslError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MedsslError(f"{out}: a run dir from before {RECORD_NAME} whose latest checkpoint cannot "
                          f"be adopted ({first}); choose another output_dir") from None
    if not isinstance(ckpt.get("config"), dict):
        raise MedsslError(f"{path}: records no config, so {out} cannot be adopted as this run; "
                          "choose another output_dir")
    return ckpt, path.name


def _recorded_config(state: _State) -> dict[str, Any] | None:
    if state.record is not None:
        return state.record.config
    if state.legacy is not None:
        return state.legacy["config"]
    return None


def _compare_config(cfg: PretrainConfig, state: _State, force: bool) -> dict[str, tuple[Any, Any]]:
    """Differences ``--force-resume`` allowed; raises ConfigError for any other difference."""
    recorded = _recorded_config(state)
    if recorded is None:
        return {}
    defaults = _declared_defaults()
    changes = {}
    for key, (old, new) in config_diff(recorded, to_dict(cfg)).items():
        if new is ABSENT:
            log.info("%s: %s is no longer a setting (recorded %r); ignored", cfg.output_dir, key, old)
        elif old is ABSENT and key in defaults and defaults[key] == new:
            continue   # a setting newer than the record, at its default: what the run did
        else:
            changes[key] = (old, new)
    safe = {k: v for k, v in changes.items() if _matches(k, RESUME_SAFE)}
    unsafe = {k: v for k, v in changes.items() if k not in safe}
    where = record_path(cfg.output_dir) if state.record is not None else Path(cfg.output_dir) / CHECKPOINTS
    if safe:
        log.info("resuming with changed settings: %s", format_changes(safe))
    if not unsafe:
        return {}
    fixed = {k: v for k, v in unsafe.items() if _matches(k, NEVER_FORCED)}
    if fixed:
        raise ConfigError(f"{where}: output_dir holds a run with {format_changes(fixed)}; these cannot "
                          "change on resume (the checkpoint would not fit): use another output_dir or "
                          "restore the settings")
    if not force:
        raise ConfigError(f"{where}: output_dir holds another run: {format_changes(unsafe)}; use another "
                          "output_dir, restore the settings, or pass --force-resume to continue this run "
                          f"with them (recorded in {RECORD_NAME})")
    return unsafe


def _declared_defaults() -> dict[str, Any]:
    """Dotted key -> the default declared in pretrain/config.py (method defaults unresolved)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(PretrainConfig):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return flatten(to_dict(values))


def _check_data(cfg: PretrainConfig, urls: list[str], out: Path, state: _State) -> ShardReport:
    cache = read_cache(out) if state.kind != "new" else {}
    return check_shards(urls, cfg.data.shards, cfg.data.split, cfg.data.verify, cache)


def _compare_data(state: _State, report: ShardReport, force: bool, step: int) -> dict[str, tuple[Any, Any]]:
    """A resumed run must read the shard folders it read before, unchanged (same index.json)."""
    if state.record is None or not state.record.data:
        return {}
    def key(sources: list) -> list[tuple[str, str | None, str | None]]:
        return sorted((s.folder, s.split, s.index_sha256) for s in sources)

    before, now = state.record.latest_sources(), report.sources
    if key(before) == key(now):
        return {}
    if not force:
        raise MedsslError(f"data.shards: not the shards this run read before step {step} (recorded: "
                          f"{source_summary(before)}; now: {source_summary(now)}); an index.json that "
                          "changed means different data: restore the shards, use another output_dir, "
                          "or pass --force-resume (recorded in run.json)")
    return {"data.sources": (source_summary(before), source_summary(now))}


def _adopt(out: Path, state: _State) -> list[CheckpointEntry]:
    """Entries for a legacy dir's checkpoint files, its latest last, hashed now."""
    assert state.legacy is not None and state.legacy_file is not None
    folder = out / CHECKPOINTS
    latest = folder / state.legacy_file
    bad = nonfinite_tensors(state.legacy["model"])
    if bad:
        raise MedsslError(f"{latest}: {len(bad)} weight tensors are not finite (first: {bad[0]}), so "
                          f"{out} cannot be adopted as this run; choose another output_dir")
    step = int(state.legacy.get("step", 0))
    entries = []
    for path in sorted(folder.glob("step_*.pt")):
        match = re.fullmatch(r"step_(\d+)\.pt", path.name)
        if match and int(match.group(1)) < step:
            entries.append(CheckpointEntry(file=path.name, step=int(match.group(1)), sha256=sha256_file(path),
                                           bytes=path.stat().st_size, weights_finite=None))
    entries.append(CheckpointEntry(file=latest.name, step=step, sha256=sha256_file(latest),
                                   bytes=latest.stat().st_size, weights_finite=True))
    log.warning("%s: a run dir from before %s whose checkpoint config matches this run: adopting it "
                "(%d checkpoints recorded, from now on verified on every resume)", out, RECORD_NAME, len(entries))
    return entries


def record_start(plan: RunPlan, cfg: PretrainConfig, world_size: int, augment: dict[str, Any],
                 data_intensity: dict[str, Any]) -> RunRecord:
    """The run record as this start leaves it: identity and config now, history appended.

    ``augment``: ``GpuAugment.record()``; ``data_intensity``: ``summarize_intensity(urls)``.
    """
    from medssl import __version__
    from medssl.config import git_sha

    sha = git_sha()
    norm = augment["normalization"]
    intensity = Intensity(pipeline=str(augment["intensity"]), mean=list(norm["mean"]), std=list(norm["std"]),
                          window_jitter=dict(augment.get("window_jitter") or {}),
                          modality=data_intensity.get("modality"), unit=data_intensity.get("unit"),
                          window=data_intensity.get("window"))
    identity: dict[str, Any] = {
        "medssl_version": __version__, "git_sha": sha, "method": cfg.method.name, "arch": cfg.model.arch,
        "in_chans": cfg.model.in_chans, "input_size": crop_size(cfg),   # volumes: the cube's side
        "model_kwargs": dict(cfg.model.kwargs), "intensity": intensity, "config": to_dict(cfg)}
    sources = plan.report.sources if plan.report is not None else []
    if plan.record is None:
        record = RunRecord(**identity)
        record.data = [dataclasses.replace(s, from_step=0) for s in sources]
        record.checkpoints = list(plan.adopted)
    else:
        record = dataclasses.replace(plan.record, **identity)
        # Newer entries were passed over as damaged: this run continues from plan.start.
        record.checkpoints = [e for e in record.checkpoints if e.step <= plan.start]
        if "data.sources" in plan.forced:
            record.data = [*record.data, *(dataclasses.replace(s, from_step=plan.start) for s in sources)]
    if plan.forced:
        record.forced_resumes.append(ForcedResume(
            step=plan.start, changed={k: [old, new] for k, (old, new) in plan.forced.items()}))
    record.starts.append(Start(step=plan.start, world_size=world_size, medssl_version=__version__,
                               git_sha=sha, adopted=plan.kind == "legacy"))
    return record


def _intact_checkpoint(out: Path, record: RunRecord) -> CheckpointEntry | None:
    entry, damaged = newest_intact(out, record)
    if not damaged:
        return entry
    passed = ", ".join(f"{e.file} ({why})" for e, why in damaged)
    if entry is None:
        raise MedsslError(f"{out / CHECKPOINTS}: no intact checkpoint: {passed}; restore one from a "
                          "backup, or start a new output_dir")
    log.warning("%s: %s; resuming from %s (step %d), the newest intact checkpoint",
                out / CHECKPOINTS, passed, entry.file, entry.step)
    return entry
