"""``medssl shard``: scans -> de-identified, patient-split WebDataset shards + index.json.

Pipeline. Inputs (discovered files, or a recipe's manifest entries) are read, de-identified and
PNG-encoded by ``--workers`` processes; the parent receives the encoded samples *in input
order* (a bounded window of futures, consumed first-in first-out, so memory stays flat however
large the corpus) and appends each sample to the open shard of its split. Every sample of a
patient goes to the same split (``splits.assign_split`` on the pseudonym).

Determinism. Keys are salted HMACs, tar headers carry fixed mtime/owner, metadata is written
with sorted keys, and samples reach the writer in input order: the shard bytes depend only on
the inputs, the salt and the sharding options, never on the worker count or timing.

Resume. A shard is written as ``{split}-{NNNNNN}.tar.tmp`` and renamed to ``.tar`` once
complete, fsynced, and its sha256 known; then a record of it is appended to the progress
journal ``.progress.jsonl`` inside the shard folder. The journal also gets one line per
finished input (its outcome and per-split sample counts and patient pseudonyms -- never a
path). On a re-run with the same arguments the journal's shards that still hash correctly are
kept (a contiguous run per split), ``.tmp`` and unrecorded shards are deleted, and processing
restarts at the first input whose samples are not all inside kept shards. Because the output
is deterministic in input order, the re-processed samples that were already in kept shards
are skipped by count, and the rest land in exactly the shards an uninterrupted run would have
written. index.json is written last and the journal then deleted: a folder with index.json is
complete, and a re-run with the same arguments is a no-op ("already complete"); with other
arguments it is refused rather than mixed.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from medssl.data import sample as sample_mod
from medssl.data.journal import JOURNAL_NAME, build_index, config_change, open_journal
from medssl.data.shards import INDEX_NAME, file_sha256
from medssl.data.splits import assign_split, parse_splits
from medssl.errors import ConfigError, MedsslError

log = logging.getLogger(__name__)

#: Modality default display windows (center, width) in modality units, used when a slice has none.
DEFAULT_WINDOWS = {"CT": (40.0, 400.0)}
_FILES_PER_TASK = 4       # amortises inter-process overhead for one-slice DICOM files
_TASKS_PER_WORKER = 2     # in-flight tasks per worker: keeps workers busy, bounds memory
_VOLUME_SUFFIXES = (".nii", ".nii.gz")  # hundreds of slices each: one file per task


@dataclass(frozen=True)
class InputItem:
    """One input file and what a recipe says about it (None when there is no manifest)."""

    index: int
    path: str                       # as discovered: goes to the report only
    patient_id: str | None = None
    label: int | list[int] | None = None
    split: str | None = None
    slice: int | None = None        # keep only this slice of a volume (recipe slice_column)
    quarantine: str | None = None   # the recipe already knows it cannot be written

    @property
    def identity(self) -> str:
        """The absolute path: keys and the inputs digest must not depend on the cwd."""
        return str(Path(self.path).resolve())


@dataclass(frozen=True)
class Job:
    """Settings every worker needs; picklable."""

    salt: bytes
    fractions: dict
    axis: str
    allow_burned_in: bool
    max_side: int


@dataclass
class Encoded:
    """One sample, ready for the tar: member bytes plus routing information."""

    key: str
    png: bytes
    meta: bytes
    cls: bytes | None
    split: str
    patient: str


@dataclass
class InputResult:
    """The outcome of one input file: its samples (all or none) or its quarantine reason."""

    index: int
    outcome: str                    # "written" | "quarantined"
    reason: str | None = None
    detail: str | None = None       # exception class of an unexpected error; report only
    samples: list[Encoded] = field(default_factory=list)
    modality: str | None = None


# ---------------------------------------------------------------- worker side

_PSEUDO_CACHE: dict[bytes, object] = {}


def _pseudonymizer(salt: bytes):
    from medssl.data import deid

    if salt not in _PSEUDO_CACHE:
        _PSEUDO_CACHE[salt] = deid.Pseudonymizer(salt)
    return _PSEUDO_CACHE[salt]


def default_window(pixels: np.ndarray, modality: str | None) -> tuple[float, float]:
    """(center, width) for a ``[H, W]`` slice with no stored window: modality default, else
    the 0.5/99.5 percentiles of its values."""
    if modality in DEFAULT_WINDOWS:
        return DEFAULT_WINDOWS[modality]
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    return float((lo + hi) / 2.0), float(max(hi - lo, 1e-6))


def encode_slice(sl: sample_mod.Slice, pseudo, item: InputItem, slice_no: int, job: Job) -> Encoded:
    """De-identify and encode one slice (the hot path: one PNG encode per slice)."""
    from medssl.data import deid

    # A recipe's patient column and label win over what the file's header says.
    if item.patient_id is not None:
        sl.patient_id = item.patient_id
    if item.label is not None:
        sl.label = item.label
    if sl.pixels.ndim == 2:
        stored, offset, slope = sample_mod.encode_intensity(sl.pixels)
        intensity = {"offset": offset, "slope": slope}
        if sl.window is None:
            sl.window = default_window(sl.pixels, sl.modality)
    else:
        stored = np.ascontiguousarray(sl.pixels, dtype=np.uint8)
        intensity = None
    meta = deid.sample_metadata(sl, pseudo, intensity=intensity)
    patient = meta["patient"]
    split = assign_split(patient, job.fractions, item.split)
    unknown = set(meta) - set(sample_mod.SAMPLE_META_KEYS)
    if unknown:  # a bug in the allow-list, not user error: refuse rather than leak
        raise RuntimeError(f"sample metadata outside SAMPLE_META_KEYS: {sorted(unknown)}")
    label = meta.get("label")
    cls = str(label).encode("ascii") if isinstance(label, int) else None
    key = pseudo.sample_key(patient, item.identity, slice_no)
    png = sample_mod.encode_png(stored)
    return Encoded(key=key, png=png,
                   meta=json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
                   cls=cls, split=split, patient=patient)


def process_input(item: InputItem, job: Job) -> InputResult:
    """Read one file to samples; a file is written whole or quarantined whole."""
    from medssl.data import readers

    if item.quarantine:
        return InputResult(item.index, "quarantined", reason=item.quarantine)
    pseudo = _pseudonymizer(job.salt)
    samples: list[Encoded] = []
    modality = None
    try:
        slices = readers.read_slices(Path(item.path), axis=job.axis,
                                     allow_burned_in=job.allow_burned_in, max_side=job.max_side)
        for slice_no, sl in enumerate(slices):
            if item.slice is not None and slice_no != item.slice:
                if slice_no > item.slice:
                    break
                continue
            modality = modality or sl.modality
            samples.append(encode_slice(sl, pseudo, item, slice_no, job))
    except readers.Quarantine as exc:
        return InputResult(item.index, "quarantined", reason=str(exc.reason))
    except MedsslError:
        raise
    except Exception as exc:
        # Class name only, like the readers: exception text can quote header values, and the
        # report must not carry what a scan's header holds.
        return InputResult(item.index, "quarantined", reason="read_error",
                           detail=type(exc).__name__)
    if not samples:
        reason = "no_images" if item.slice is None else "slice_out_of_range"
        return InputResult(item.index, "quarantined", reason=reason)
    return InputResult(item.index, "written", samples=samples, modality=modality)


def _process_chunk(items: list[InputItem], job: Job) -> list[InputResult]:
    return [process_input(item, job) for item in items]


def _chunks(items: list[InputItem]) -> Iterator[list[InputItem]]:
    """Consecutive runs of up to ``_FILES_PER_TASK`` files; a volume always travels alone."""
    chunk: list[InputItem] = []
    for item in items:
        volume = item.path.lower().endswith(_VOLUME_SUFFIXES)
        if chunk and (volume or len(chunk) >= _FILES_PER_TASK):
            yield chunk
            chunk = []
        chunk.append(item)
        if volume:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_results(items: list[InputItem], job: Job, workers: int) -> Iterator[InputResult]:
    """Results in input order, with at most ``workers * _TASKS_PER_WORKER`` tasks in flight.

    Memory is bounded by that window (a few files' encoded samples per worker), not by the
    corpus: results are consumed first-in first-out, so a slow parent stalls submission.
    """
    chunks = _chunks(items)
    if workers <= 1:
        for chunk in chunks:
            yield from _process_chunk(chunk, job)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(_process_chunk, chunk, job))
                if len(pending) >= workers * _TASKS_PER_WORKER:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


# ---------------------------------------------------------------- parent side

class SplitWriter:
    """Shards of one split: ``{split}-{NNNNNN}.tar.tmp`` renamed to ``.tar`` when complete.

    Written by hand over ``webdataset.TarWriter`` because ``ShardWriter`` opens its first file
    eagerly (empty shards for empty splits), rolls over only when the next sample arrives,
    prints to stdout, and has no atomic rename -- all of which break resume.
    """

    def __init__(self, out: Path, split: str, shard_size: int, next_shard: int,
                 skip_until: int, counter: int, on_complete) -> None:
        self.out, self.split, self.shard_size = out, split, shard_size
        self.next_shard = next_shard
        self.skip_until = skip_until    # samples with a lower split-index are in kept shards
        self.counter = counter          # split-index of the next sample
        self.on_complete = on_complete
        self.writer: wds.TarWriter | None = None
        self.file = None
        self.count = 0

    def write(self, enc: Encoded) -> None:
        index = self.counter
        self.counter += 1
        if index < self.skip_until:
            return
        if self.writer is None:
            self.file = open(self.out / f"{self.split}-{self.next_shard:06d}.tar.tmp", "wb")
            self.writer = wds.TarWriter(self.file, encoder=False, mtime=0.0, user="medssl",
                                        group="medssl", mode=0o444)
            self.count = 0
        sample = {"__key__": enc.key, "img.png": enc.png, "json": enc.meta}
        if enc.cls is not None:
            sample["cls"] = enc.cls
        self.writer.write(sample)
        self.count += 1
        if self.count >= self.shard_size:
            self.close()

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        tmp = Path(self.file.name)
        final = tmp.with_suffix("")  # drop ".tmp"
        os.replace(tmp, final)
        self.on_complete(final.name, self.split, self.count, file_sha256(final))
        self.next_shard += 1
        self.writer = None
        self.file = None


def _inputs_digest(salt: bytes, items: list[InputItem]) -> str:
    # Salted, so the index can tell "same inputs" apart without revealing any path. Labels and
    # splits are in it too: a re-run after a manifest edit must not pass as "already complete".
    text = json.dumps([[it.identity, it.patient_id, it.label, it.split, it.slice, it.quarantine]
                       for it in items])
    return hmac.new(salt, text.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def _collect_inputs(args: argparse.Namespace):
    """(items, recipe) from the recipe's manifest, or from discovered files."""
    recipe = None
    if getattr(args, "recipe", None):
        from medssl.data.recipes import load_recipe

        recipe = load_recipe(args.recipe)
    if recipe is not None and recipe.manifest is not None:
        # include_dropped: rows the label policy drops are reported, not silently skipped
        entries = recipe.manifest_entries(list(args.inputs), include_dropped=True)
        items = [InputItem(i, str(e.path), patient_id=str(e.patient_id), label=e.label,
                           split=e.split, slice=e.slice, quarantine=e.quarantine)
                 for i, e in enumerate(entries)]
    else:
        from medssl.data import readers

        items = [InputItem(i, str(p)) for i, p in enumerate(readers.discover(list(args.inputs)))]
    if not items:
        raise MedsslError(f"shard: no input files found under {', '.join(map(str, args.inputs))}")
    return items, recipe


def _validate(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.max_side < 8:
        raise ConfigError(f"--max-side must be >= 8 px, got {args.max_side}")
    if not 0.0 <= args.max_bad <= 1.0:
        raise ConfigError(f"--max-bad is a fraction in [0, 1], got {args.max_bad}")


def report_path(args: argparse.Namespace) -> Path:
    """``--report`` or ``<out>.report.jsonl`` beside the shard folder; never inside it."""
    out = Path(args.out).resolve()
    default = out.parent / f"{out.name}.report.jsonl"
    path = Path(args.report) if getattr(args, "report", None) else default
    if out in path.resolve().parents:
        raise ConfigError(f"--report {path} is inside the shard folder; the report names source "
                          "files (which can carry patient names), so put it beside the folder")
    return path


def _report_line(item: InputItem, entry: dict, detail: str | None = None) -> str:
    line: dict = {"path": item.path, "outcome": entry["outcome"]}
    if entry["outcome"] == "written":
        line["samples"] = sum(entry["samples"].values())
    else:
        line["reason"] = entry["reason"]
        if detail:
            line["detail"] = detail
    return json.dumps(line) + "\n"


def _finish(index: dict, report: Path, max_bad: float, already: bool = False) -> int:
    inputs = index["inputs"]
    splits = " / ".join(f"{s} {v['samples']}" for s, v in index["splits"].items())
    reasons = ", ".join(f"{r} {n}" for r, n in inputs["quarantined_by_reason"].items()) or "none"
    total = sum(v["samples"] for v in index["splits"].values())
    prefix = "already complete: " if already else ""
    # The one line a user (or script) reads after a long run; stdout on purpose.
    print(f"{prefix}wrote {total} samples from {inputs['written']} files into "
          f"{len(index['shards'])} shards ({splits}); {inputs['quarantined']} files quarantined "
          f"({reasons}) — report: {report}")
    bad = inputs["quarantined"] / max(inputs["seen"], 1)
    if bad > max_bad:
        log.error("%d of %d inputs quarantined (%.1f%%), more than --max-bad %g; see %s",
                  inputs["quarantined"], inputs["seen"], 100 * bad, max_bad, report)
        return 1
    return 0


def shard_command(args: argparse.Namespace) -> int:
    """Run ``medssl shard``; returns the exit code (1 when ``--max-bad`` is exceeded)."""
    from medssl.data import deid

    _validate(args)
    fractions = parse_splits(args.splits)
    report = report_path(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    salt = deid.load_or_create_salt(args.salt_file, out)
    items, recipe = _collect_inputs(args)
    config = {
        "splits": fractions, "max_side": args.max_side, "shard_size": args.shard_size,
        "axis": args.axis, "recipe": (getattr(recipe, "name", None) or Path(args.recipe).stem)
        if recipe else None,
        "salt_id": deid.salt_id(salt), "allow_burned_in": bool(args.allow_burned_in),
        "inputs": {"count": len(items),
                   "digest": _inputs_digest(salt, items)},
    }
    index_file = out / INDEX_NAME
    if index_file.exists():
        index = json.loads(index_file.read_text(encoding="utf-8"))
        change = config_change(index.get("config"), config)
        if change:
            raise MedsslError(f"{out}: already holds finished shards made with different settings "
                              f"({change}); use a new --out folder or delete this one")
        (out / JOURNAL_NAME).unlink(missing_ok=True)  # killed between index and clean-up
        return _finish(index, report, args.max_bad, already=True)

    journal, restart, split_state = open_journal(out, config, len(items))
    writers: dict[str, SplitWriter] = {}

    def writer_for(split: str) -> SplitWriter:
        if split not in writers:
            next_shard, capacity, counter = split_state.get(split, (0, 0, 0))
            writers[split] = SplitWriter(out, split, args.shard_size, next_shard, capacity,
                                         counter, journal.add_shard)
        return writers[split]

    job = Job(salt=salt, fractions=fractions, axis=args.axis,
              allow_burned_in=bool(args.allow_burned_in), max_side=args.max_side)
    with open(report, "w", encoding="utf-8") as rep:
        for entry in journal.entries:  # inputs finished before an interruption
            rep.write(_report_line(items[entry["input"]], entry))
        bar = tqdm(total=len(items), initial=restart, unit="file", desc="shard", disable=None)
        for result in iter_results(items[restart:], job, args.workers):
            for enc in result.samples:
                writer_for(enc.split).write(enc)
            entry = journal.add_input(result)
            rep.write(_report_line(items[result.index], entry, result.detail))
            rep.flush()
            if result.outcome == "quarantined":
                # Input number, not path: paths can carry patient names and logs travel.
                log.warning("input #%d quarantined: %s", result.index, result.reason)
            bar.update(1)
        bar.close()
    for writer in writers.values():
        writer.close()
    index = build_index(journal, len(items), fractions,
                        recipe.labels_info() if recipe is not None else None)
    tmp = index_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, index_file)
    journal.close(delete=True)
    return _finish(index, report, args.max_bad)
