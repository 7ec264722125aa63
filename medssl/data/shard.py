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
import datetime
import hashlib
import hmac
import json
import logging
import os
import struct
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from medssl import __version__
from medssl.data import sample as sample_mod
from medssl.data.shards import file_sha256
from medssl.data.splits import assign_split, parse_splits
from medssl.errors import ConfigError, MedsslError

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
JOURNAL_NAME = ".progress.jsonl"
FORMAT = "medssl-shards/1"
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


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png16(image: np.ndarray) -> bytes:
    """PNG bytes of a uint16 ``[H, W]`` image: "Up" filter on every row, run-length deflate,
    no ancillary (text) chunks. Decodes with PIL to the same array (``sample.decode_image``).

    Written by hand because ingestion is PNG-bound and PIL's encoder always runs adaptive
    filtering (tries several filters per row) and offers no deflate strategy: on a 512x512 CT
    slice PIL at compress_level=1 spent 13.7 ms of CPU, this 4.7 ms, for a file ~1% smaller
    (Z_RLE suits filtered CT rows: long runs of near-zero differences). That is most of the
    gap between ~68 and 100+ slices/s per worker (benchmarks/ingest.py).
    """
    if image.dtype != np.uint16 or image.ndim != 2:
        raise ValueError(f"expected uint16 [H, W], got {image.dtype} {image.shape}")
    h, w = image.shape
    raw = np.ascontiguousarray(image, dtype=">u2").view(np.uint8).reshape(h, 2 * w)
    rows = np.empty((h, 2 * w + 1), np.uint8)
    rows[:, 0] = 2            # filter type Up: byte minus the byte above, mod 256
    rows[0, 0] = 0            # the first row has nothing above it
    rows[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=rows[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)  # 16-bit grayscale, no interlace
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", deflate.compress(rows.tobytes()) + deflate.flush())
            + _png_chunk(b"IEND", b""))


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
    png = encode_png16(stored) if stored.ndim == 2 else sample_mod.encode_png(stored)
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


class Journal:
    """``.progress.jsonl`` in the shard folder: the config, completed shards, finished inputs.

    Holds pseudonyms and counts only -- never a path -- so it is harmless if copied along.
    """

    def __init__(self, path: Path, config: dict) -> None:
        self.path = path
        self.config = config
        self.shards: list[dict] = []
        self.entries: list[dict] = []
        self._file = None

    def rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in [{"config": self.config}, *self.shards, *self.entries]:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def _append(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def add_shard(self, name: str, split: str, samples: int, sha256: str) -> None:
        record = {"shard": name, "split": split, "samples": samples, "sha256": sha256}
        self.shards.append(record)
        self._append(record)

    def add_input(self, result: InputResult) -> dict:
        samples: Counter = Counter(enc.split for enc in result.samples)
        patients: dict[str, list[str]] = {}
        for enc in result.samples:
            if enc.patient not in patients.setdefault(enc.split, []):
                patients[enc.split].append(enc.patient)
        entry = {"input": result.index, "outcome": result.outcome, "reason": result.reason,
                 "samples": dict(samples), "patients": patients, "modality": result.modality}
        self.entries.append(entry)
        self._append(entry)
        return entry

    def close(self, delete: bool = False) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if delete:
            self.path.unlink(missing_ok=True)


def _config_change(old: dict | None, new: dict) -> str | None:
    """A short description of how two sharding configs differ, or None when equal."""
    old = json.loads(json.dumps(old or {}))
    new = json.loads(json.dumps(new))
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" if k != "inputs" else
                     "the input files differ" for k in diffs) or None


def open_journal(out: Path, config: dict, n_inputs: int) -> tuple[Journal, int, dict]:
    """Load or start the journal; drop incomplete work; return (journal, restart input, splits).

    ``splits`` maps split -> (next shard number, samples already in kept shards, split-index of
    the restart input's first sample).
    """
    journal = Journal(out / JOURNAL_NAME, config)
    stray = sorted(p.name for p in out.iterdir() if p.name.endswith((".tar", ".tar.tmp")))
    if not journal.path.exists():
        if stray:
            raise MedsslError(f"{out}: holds shards ({stray[0]}, ...) but no {INDEX_NAME} or "
                              "progress journal; use a new --out folder or empty this one")
        journal.rewrite()
        return journal, 0, {}
    records = []
    for line in journal.path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by the interruption; everything after it is redone
    if not records or "config" not in records[0]:
        raise MedsslError(f"{journal.path}: progress journal is damaged; delete {out} and re-run")
    change = _config_change(records[0]["config"], config)
    if change:
        raise MedsslError(f"{out}: an interrupted run with different settings is in this folder "
                          f"({change}); re-run with its arguments, or use a new --out folder")
    # Keep, per split, the contiguous run of recorded shards that still hash correctly.
    kept: dict[str, list[dict]] = {}
    broken: set[str] = set()
    for rec in (r for r in records if "shard" in r):
        split_shards = kept.setdefault(rec["split"], [])
        path = out / rec["shard"]
        expected = f"{rec['split']}-{len(split_shards):06d}.tar"
        if (rec["split"] not in broken and rec["shard"] == expected and path.exists()
                and file_sha256(path) == rec["sha256"]):
            split_shards.append(rec)
        else:
            broken.add(rec["split"])  # later shards of this split are rewritten too
    journal.shards = [rec for recs in kept.values() for rec in recs]
    keep_names = {rec["shard"] for rec in journal.shards}
    for name in stray:
        if name not in keep_names:
            (out / name).unlink()
    capacity = {s: sum(r["samples"] for r in recs) for s, recs in kept.items()}
    cumulative: Counter = Counter()
    restart = 0
    for entry in (r for r in records if "input" in r):
        if entry["input"] != restart or restart >= n_inputs:
            break
        if any(cumulative[s] + n > capacity.get(s, 0) for s, n in entry["samples"].items()):
            break
        journal.entries.append(entry)
        cumulative.update(entry["samples"])
        restart += 1
    journal.rewrite()
    splits = {s: (len(kept.get(s, [])), capacity.get(s, 0), cumulative[s])
              for s in set(capacity) | set(cumulative)}
    log.info("resuming: %d of %d inputs and %d shards kept from the interrupted run",
             restart, n_inputs, len(journal.shards))
    return journal, restart, splits


def build_index(journal: Journal, n_inputs: int, fractions: dict, labels: dict | None) -> dict:
    """index.json's content (docs/internals.md) from the journal: counts, hashes, config."""
    samples: Counter = Counter()
    patients: dict[str, set] = {s: set() for s in fractions}
    for entry in journal.entries:
        samples.update(entry["samples"])
        for split, pseudos in entry["patients"].items():
            patients.setdefault(split, set()).update(pseudos)
    in_shards: Counter = Counter()
    for rec in journal.shards:
        in_shards[rec["split"]] += rec["samples"]
    if +in_shards != +samples:  # the journal and the files disagree: never publish that
        raise RuntimeError(f"shard counts {dict(in_shards)} != input counts {dict(samples)}")
    outcomes = Counter(e["outcome"] for e in journal.entries)
    reasons = Counter(e["reason"] for e in journal.entries if e["outcome"] == "quarantined")
    modalities = Counter(e["modality"] or "unknown" for e in journal.entries
                         if e["outcome"] == "written")
    return {
        "format": FORMAT,
        "medssl_version": __version__,
        "created": str(datetime.date.today().year),
        "shards": {r["shard"]: {"split": r["split"], "samples": r["samples"], "sha256": r["sha256"]}
                   for r in sorted(journal.shards, key=lambda r: r["shard"])},
        "splits": {s: {"samples": samples[s], "patients": len(patients[s])} for s in patients},
        "inputs": {"seen": n_inputs, "written": outcomes["written"],
                   "quarantined": outcomes["quarantined"],
                   "quarantined_by_reason": dict(sorted(reasons.items()))},
        "labels": labels,
        "config": journal.config,
        "modalities": dict(sorted(modalities.items())),
    }


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
        change = _config_change(index.get("config"), config)
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
