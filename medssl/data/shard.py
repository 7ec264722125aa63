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
complete, and a re-run with the same arguments is a no-op ("already complete") once every
listed shard is checked to exist with its recorded size and sha256 (a damaged folder is
refused, naming the shard); with other arguments it is refused rather than mixed.

Volumes. ``--volumes`` runs the same pipeline with one input per volume (a DICOM series or a
NIfTI file, planned from headers by ``volume_plan``, read by ``volumes``) and one sample per
volume, ``vol.npy.gz`` in place of ``img.png``; index.json's config records ``volumes: true``
and the ``spacing``, so a re-run with other settings is refused and readers can tell a volume
folder from a 2-D one.

Safety. Arguments, splits, the salt and the inputs are all checked before the shard folder is
created; the folder is then locked (``medssl.lock.FolderLock``) for the whole run, so a second
``medssl shard`` into it refuses in one line instead of deleting the first one's temporary
files. A new salt file is written only once the run is known to go ahead. Each worker decodes
under the ``--max-pixels`` budget (``budget``), so its memory stays flat whatever a file
claims; a grayscale slice with no finite value is left out of its file (``skipped`` in the
report) rather than losing the file.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from medssl.data.attributes import DEFAULT_AGE_BINS, parse_header_names
from medssl.data.journal import (
    build_index,
    check_complete,
    check_existing,
    open_journal,
)
from medssl.data.readers import identity
from medssl.data.report import finish, report_line, report_path
from medssl.data.layout import INDEX_NAME, JOURNAL_NAME
from medssl.io import sha256_file
from medssl.data.splits import parse_splits
from medssl.data.worker import Encoded, InputItem, Job, iter_results
from medssl.errors import ConfigError, MedsslError
from medssl.lock import FolderLock

log = logging.getLogger(__name__)


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
        sample = {"__key__": enc.key, enc.member: enc.png, "json": enc.meta}
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
        self.on_complete(final.name, self.split, self.count, sha256_file(final),
                         final.stat().st_size)
        self.next_shard += 1
        self.writer = None
        self.file = None


def _inputs_digest(salt: bytes, items: list[InputItem]) -> str:
    # Salted, so the index can tell "same inputs" apart without revealing any path. Labels and
    # splits are in it too: a re-run after a manifest edit must not pass as "already complete".
    # A series' slice files too (only when there are: 2-D digests stay what they were), so a
    # slice added to or removed from an export is another input.
    text = json.dumps([[it.identity, it.patient_id, it.label, it.split, it.slice, it.quarantine]
                       + ([dict(it.attributes)] if it.attributes else [])
                       + ([[identity(f) for f in it.files]] if it.files else []) for it in items])
    return hmac.new(salt, text.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def _collect_inputs(args: argparse.Namespace, salt: bytes | None = None):
    """(items, recipe) from the recipe's manifest, or from discovered files."""
    recipe = None
    if getattr(args, "recipe", None):
        from medssl.data.recipes import load_recipe

        recipe = load_recipe(args.recipe)
    if getattr(args, "volumes", False):
        return _volume_inputs(args, recipe, salt), recipe
    if recipe is not None and recipe.manifest is not None:
        # include_dropped: rows the label policy drops are reported, not silently skipped
        entries = recipe.manifest_entries(list(args.inputs), include_dropped=True, salt=salt)
        wants_masks = getattr(args, "masks_out", None) is not None
        items = [InputItem(i, str(e.path), patient_id=str(e.patient_id), label=e.label,
                           split=e.split, slice=e.slice, quarantine=e.quarantine,
                           attributes=tuple(sorted(e.attributes.items())),
                           mask=(str(e.mask) if e.mask else "") if wants_masks else None)
                 for i, e in enumerate(entries)]
    else:
        from medssl.data import readers

        items = [InputItem(i, str(f.path), quarantine=f.problem)
                 for i, f in enumerate(readers.discover(list(args.inputs)))]
    if not items:
        raise MedsslError(f"shard: no input files found under {', '.join(map(str, args.inputs))}")
    return items, recipe


def _volume_inputs(args: argparse.Namespace, recipe, salt: bytes | None) -> list[InputItem]:
    """``--volumes``: one InputItem per DICOM series or NIfTI volume (``volume_plan``), from
    discovered files or, with a recipe's manifest, one per row (a NIfTI or a series folder)."""
    from medssl.data import readers, volume_plan
    from medssl.data.volumes import parse_spacing

    pixdim = parse_spacing(args.spacing)
    if recipe is not None and recipe.manifest is not None:
        if recipe.slice_column:
            raise ConfigError(f"--volumes: recipe {recipe.source or recipe.name} has a "
                              "slice_column; a volume sample is the whole volume, one label each")
        entries = recipe.manifest_entries(list(args.inputs), include_dropped=True, salt=salt,
                                          folders=True)
        todo = [e for e in entries if not e.quarantine]
        planned = iter(volume_plan.plan_rows([e.path for e in todo], pixdim, args.max_pixels,
                                             args.workers))
        items = []
        for i, e in enumerate(entries):
            where = {"path": str(e.path), "quarantine": e.quarantine} if e.quarantine \
                else next(planned)
            items.append(InputItem(i, patient_id=str(e.patient_id), label=e.label, split=e.split,
                                   attributes=tuple(sorted(e.attributes.items())), **where))
    else:
        found = readers.discover(list(args.inputs))
        log.info("volumes: reading the headers of %d files", len(found))
        items = [InputItem(i, **p) for i, p in
                 enumerate(volume_plan.plan(found, pixdim, args.max_pixels, args.workers))]
    if not items:
        raise MedsslError(f"shard: no input files found under {', '.join(map(str, args.inputs))}")
    return items


def _attributes_config(recipe, header: tuple[str, ...]) -> dict:
    """index.json config's ``attributes``: name -> where it comes from and how it is coarsened
    (``{"from": "column", "column": ..., "bins": ...}`` or ``{"from": "header"}``). A recipe
    column wins over the header for the same name."""
    if recipe is not None:
        header = tuple(dict.fromkeys(header + parse_header_names(recipe.header_attributes,
                                                                 "header_attributes")))
    out: dict = {}
    for name in header:
        out[name] = {"from": "header"}
        if name == "age":
            out[name]["bins"] = list(DEFAULT_AGE_BINS)
    if recipe is not None:
        for name, info in recipe.attributes_info().items():
            out[name] = {"from": "column", **info}
    return dict(sorted(out.items()))


def _validate(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.max_side < 8:
        raise ConfigError(f"--max-side must be >= 8 px, got {args.max_side}")
    if args.max_pixels < 1:
        raise ConfigError(f"--max-pixels must be a positive number of pixel values, got "
                          f"{args.max_pixels}")
    if getattr(args, "volumes", False):
        from medssl.data.volumes import parse_spacing

        parse_spacing(args.spacing)
        if getattr(args, "masks_out", None) is not None:
            raise ConfigError("--masks-out is for 2-D slices; drop it with --volumes")
    elif getattr(args, "spacing", None) is not None:
        raise ConfigError("--spacing is the voxel size of --volumes; add --volumes or drop it")
    if not 0.0 <= args.max_bad <= 1.0:
        raise ConfigError(f"--max-bad is a fraction in [0, 1], got {args.max_bad}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the shards")


def shard_command(args: argparse.Namespace) -> int:
    """Run ``medssl shard``; returns the exit code (1 when the run wrote nothing or lost more
    than ``--max-bad`` of its inputs, see ``report.finish``)."""
    from medssl.data import deid

    # Everything that can be refused is checked before the folder exists (a refused run
    # leaves nothing behind) and before the lock is taken.
    _validate(args)
    fractions = parse_splits(args.splits)
    report = report_path(args)
    out = Path(args.out)
    salt, new_salt = deid.resolve_salt(args.salt_file, out)
    header = parse_header_names(getattr(args, "attributes", None))
    items, recipe = _collect_inputs(args, salt)
    attributes = _attributes_config(recipe, header)
    masks = _masks_plan(args, recipe, items)
    config = {
        "splits": fractions, "max_side": args.max_side, "shard_size": args.shard_size,
        "axis": args.axis, "recipe": (getattr(recipe, "name", None) or Path(args.recipe).stem)
        if recipe else None,
        "salt_id": deid.salt_id(salt), "allow_burned_in": bool(args.allow_burned_in),
        "max_pixels": args.max_pixels,
        "inputs": {"count": len(items),
                   "digest": _inputs_digest(salt, items)},
    }
    if attributes:  # only then: folders made without attributes keep their config
        config["attributes"] = attributes
    if getattr(args, "volumes", False):  # only then, likewise; readers tell a volume folder by it
        from medssl.data.volumes import parse_spacing

        pixdim = parse_spacing(args.spacing)
        config["volumes"] = True
        config["spacing"] = list(pixdim) if pixdim is not None else "native"
    marker = None
    if masks is not None:
        from medssl.data.masks import check_masks_out, masks_marker

        marker = masks_marker(salt, config, masks)
        masks_done = check_masks_out(Path(args.masks_out), out, marker)
    with FolderLock(out, "shard folder"):
        index = check_existing(out, config)
        if index is not None:
            check_complete(out, index)
            (out / JOURNAL_NAME).unlink(missing_ok=True)  # killed between index and clean-up
            if marker is not None and not masks_done:
                # A finished folder asked for its masks: read the inputs again (no shard is
                # touched; the worker is deterministic, so keys and grids are the shards').
                _close_masks(_mask_writer(args, marker, items, _job(args, salt, fractions, config),
                                          len(items)), args.masks_out)
            return finish(index, report, args.max_bad, already=True)
        if new_salt is not None:
            deid.save_salt(new_salt, salt)
        return _run(args, out, report, config, items, recipe, salt, fractions, marker)


def _masks_plan(args: argparse.Namespace, recipe, items: list[InputItem]) -> list | None:
    """The mask path of every input when ``--masks-out`` is given (None otherwise)."""
    if getattr(args, "masks_out", None) is None:
        return None
    if recipe is None or not getattr(recipe, "masks", None):
        where = f"recipe {recipe.source or recipe.name} has none" if recipe else "no --recipe"
        raise ConfigError(f"--masks-out {args.masks_out}: needs a --recipe whose masks: key names "
                          f"the manifest's mask column ({where}; medssl synth's is masks: mask)")
    return [it.mask for it in items]


def _job(args: argparse.Namespace, salt: bytes, fractions: dict, config: dict) -> Job:
    """What every worker needs to read an input the way this folder's config says."""
    recorded = config.get("attributes") or {}
    spacing = config.get("spacing")
    return Job(salt=salt, fractions=fractions, axis=args.axis,
               allow_burned_in=bool(args.allow_burned_in), max_side=args.max_side,
               max_pixels=args.max_pixels,
               header_attributes=tuple(n for n, v in recorded.items() if v.get("from") == "header"),
               recorded=tuple(recorded), volumes=bool(config.get("volumes")),
               spacing=tuple(spacing) if isinstance(spacing, list) else None)


def _mask_writer(args: argparse.Namespace, marker: bytes, items: list[InputItem], job: Job,
                 upto: int):
    """A ``--masks-out`` writer already holding the masks of ``items[:upto]``, read again."""
    from medssl.data.masks import MaskWriter

    writer = MaskWriter(Path(args.masks_out), marker)
    if upto:
        log.info("masks: reading %d inputs again for their finding masks", upto)
    for result in iter_results(items[:upto], job, args.workers):
        writer.add_result(result)
    return writer


def _close_masks(writer, path) -> None:
    writer.close()
    log.info("masks: %d samples (%d with a finding) -> %s", writer.count, writer.with_finding,
             path)


def _run(args: argparse.Namespace, out: Path, report: Path, config: dict,
         items: list[InputItem], recipe, salt: bytes, fractions: dict,
         marker: bytes | None = None) -> int:
    """Shard ``items`` into the locked folder ``out`` (resuming its journal if any); with a
    ``marker``, also write ``--masks-out`` (inputs finished before a resume are read again)."""
    journal, restart, split_state = open_journal(out, config, len(items))
    writers: dict[str, SplitWriter] = {}

    def writer_for(split: str) -> SplitWriter:
        if split not in writers:
            next_shard, capacity, counter = split_state.get(split, (0, 0, 0))
            writers[split] = SplitWriter(out, split, args.shard_size, next_shard, capacity,
                                         counter, journal.add_shard)
        return writers[split]

    job = _job(args, salt, fractions, config)
    masks = None if marker is None else _mask_writer(args, marker, items, job, restart)
    with open(report, "w", encoding="utf-8") as rep:
        for entry in journal.entries:  # inputs finished before an interruption
            item = items[entry["input"]]
            rep.write(report_line(item.path, entry, slices=len(item.files) or None))
        bar = tqdm(total=len(items), initial=restart, unit="file", desc="shard", disable=None)
        for result in iter_results(items[restart:], job, args.workers):
            for enc in result.samples:
                writer_for(enc.split).write(enc)
            if masks is not None:
                masks.add_result(result)
            entry = journal.add_input(result)
            item = items[result.index]
            rep.write(report_line(item.path, entry, result.detail,
                                  slices=len(item.files) or None))
            rep.flush()
            if result.outcome == "quarantined":
                # Input number, not path: paths can carry patient names and logs travel.
                log.warning("input #%d quarantined: %s", result.index, result.reason)
            elif result.skipped:
                log.warning("input #%d: %s slices skipped", result.index,
                            ", ".join(f"{len(v)} {r}" for r, v in result.skipped.items()))
            bar.update(1)
        bar.close()
    for writer in writers.values():
        writer.close()
    if masks is not None:
        _close_masks(masks, args.masks_out)
    index = build_index(journal, len(items), fractions,
                        recipe.labels_info() if recipe is not None else None)
    index_file = out / INDEX_NAME
    tmp = index_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, index_file)
    journal.close(delete=True)
    return finish(index, report, args.max_bad)
