"""The shard folder's progress journal and index: what makes ``medssl shard`` resumable.

``.progress.jsonl`` records the sharding config, every completed shard (name, split, count,
sha256, bytes) and every finished input (outcome, per-split counts, patient pseudonyms and
skipped slices -- never a path). ``check_existing`` refuses a folder made with other settings
before anything is touched; ``check_complete`` refuses a finished folder whose shards changed;
``open_journal`` turns an interrupted folder back into a restart point; ``build_index``
turns a finished journal into index.json. See ``medssl.data.shard`` for the whole scheme.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from medssl import __version__
from medssl.data.layout import FORMAT, INDEX_NAME, JOURNAL_NAME
from medssl.io import sha256_file
from medssl.errors import MedsslError

if TYPE_CHECKING:
    from medssl.data.worker import InputResult

log = logging.getLogger(__name__)



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

    def add_shard(self, name: str, split: str, samples: int, sha256: str, nbytes: int) -> None:
        record = {"shard": name, "split": split, "samples": samples, "sha256": sha256,
                  "bytes": nbytes}
        self.shards.append(record)
        self._append(record)

    def add_input(self, result: InputResult) -> dict:
        samples: Counter = Counter(enc.split for enc in result.samples)
        patients: dict[str, list[str]] = {}
        for enc in result.samples:
            if enc.patient not in patients.setdefault(enc.split, []):
                patients[enc.split].append(enc.patient)
        entry = {"input": result.index, "outcome": result.outcome, "reason": result.reason,
                 "samples": dict(samples), "patients": patients, "modality": result.modality,
                 "skipped": {r: list(v) for r, v in result.skipped.items()}}
        attributes = _count_attributes(result.samples)
        if attributes:  # coarsened values only (bands, pseudonyms): harmless like the rest
            entry["attributes"] = attributes
        self.entries.append(entry)
        self._append(entry)
        return entry

    def close(self, delete: bool = False) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if delete:
            self.path.unlink(missing_ok=True)


def _count_attributes(samples) -> dict:
    """split -> name -> {"values": {value: samples}, "absent": samples}, for recorded names."""
    out: dict = {}
    for enc in samples:
        for name, value in (getattr(enc, "attributes", None) or {}).items():
            block = out.setdefault(enc.split, {}).setdefault(name, {"values": {}, "absent": 0})
            if value is None:
                block["absent"] += 1
            else:
                block["values"][value] = block["values"].get(value, 0) + 1
    return out


def attributes_index(entries: list[dict], recorded: dict) -> dict:
    """index.json's ``attributes``: per recorded name, its values with sample counts (age bands
    in age order), the samples without a value, and the same per split."""
    from medssl.data.attributes import MAX_DISTINCT, band_order

    out: dict = {}
    for name, how in recorded.items():
        total: Counter = Counter()
        absent = 0
        splits: dict = {}
        for entry in entries:
            for split, by_name in (entry.get("attributes") or {}).items():
                block = by_name.get(name)
                if not block:
                    continue
                s = splits.setdefault(split, {"values": Counter(), "absent": 0})
                s["values"].update(block["values"])
                s["absent"] += block["absent"]
                total.update(block["values"])
                absent += block["absent"]
        if len(total) > MAX_DISTINCT:  # header values cannot be counted before reading
            log.warning("attribute %s has %d distinct values (more than %d): check it is a "
                        "category before using it", name, len(total), MAX_DISTINCT)
        order = band_order(name, list(total))
        out[name] = {**how, "values": {v: total[v] for v in order}, "absent": absent,
                     "splits": {sp: {"values": {v: b["values"][v] for v in order
                                                if b["values"][v]}, "absent": b["absent"]}
                                for sp, b in sorted(splits.items())}}
    return out


def config_change(old: dict | None, new: dict) -> str | None:
    """A short description of how two sharding configs differ, or None when equal."""
    old = json.loads(json.dumps(old or {}))
    new = json.loads(json.dumps(new))
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if "salt_id" in diffs and "inputs" in diffs and \
            (old.get("inputs") or {}).get("count") == (new.get("inputs") or {}).get("count"):
        diffs.remove("inputs")  # the digest is salted: another salt, another digest
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" if k != "inputs" else
                     "the input files differ" for k in diffs) or None


def _read_records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by the interruption; everything after it is redone
    return records


def check_existing(out: Path, config: dict) -> dict | None:
    """Refuse, without touching anything, a folder holding work made with other settings.

    Returns the parsed index.json of a finished folder (None when there is none). Raises
    MedsslError when index.json or an interrupted run's journal records other settings.
    """
    index_file = out / INDEX_NAME
    if index_file.exists():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MedsslError(f"{index_file}: not valid JSON; the folder is damaged: delete it "
                              "and re-run") from None
        change = config_change(index.get("config"), config)
        if change:
            raise MedsslError(f"{out}: already holds finished shards made with different settings "
                              f"({change}); use a new --out folder or delete this one")
        return index
    journal = out / JOURNAL_NAME
    if journal.exists():
        records = _read_records(journal)
        if records and "config" in records[0]:
            change = config_change(records[0]["config"], config)
            if change:
                raise MedsslError(f"{out}: an interrupted run with different settings is in this "
                                  f"folder ({change}); re-run with its arguments, or use a new "
                                  "--out folder")
    elif out.is_dir():
        stray = sorted(p.name for p in out.iterdir() if p.name.endswith((".tar", ".tar.tmp")))
        if stray:
            raise MedsslError(f"{out}: holds shards ({stray[0]}, ...) but no {INDEX_NAME} or "
                              "progress journal; use a new --out folder or empty this one")
    return None


def check_complete(out: Path, index: dict) -> None:
    """Refuse a finished folder whose shards are not the ones index.json lists.

    Every listed shard must exist with its recorded size (``bytes``, when the index has it)
    and sha256, and no unlisted shard may lie beside them. The first problem is named; the
    folder is never reported complete, and never rewritten: a shard that changed might be
    someone's, and re-making one needs the whole run (the journal is gone).
    """
    shards = index.get("shards") or {}
    hint = "restore it, or delete the folder and re-run"
    log.debug("%s: finished; checking its %d shards against %s", out, len(shards), INDEX_NAME)
    for name in sorted(shards):
        info = shards[name]
        path = out / name
        if not path.is_file():
            raise MedsslError(f"{out}: damaged: {name} is listed in {INDEX_NAME} but missing; "
                              f"{hint}")
        size = info.get("bytes")
        if size is not None and path.stat().st_size != size:
            raise MedsslError(f"{out}: damaged: {name} is {path.stat().st_size} bytes, "
                              f"{INDEX_NAME} says {size}; {hint}")
        if sha256_file(path) != info.get("sha256"):
            raise MedsslError(f"{out}: damaged: {name} differs from its sha256 in {INDEX_NAME}; "
                              f"{hint}")
    unlisted = sorted(p.name for p in out.iterdir()
                      if p.name.endswith((".tar", ".tar.tmp")) and p.name not in shards)
    if unlisted:
        raise MedsslError(f"{out}: holds {unlisted[0]}, which {INDEX_NAME} does not list; move it "
                          "away, or delete the folder and re-run")


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
    records = _read_records(journal.path)
    if not records or "config" not in records[0]:
        raise MedsslError(f"{journal.path}: progress journal is damaged; delete {out} and re-run")
    change = config_change(records[0]["config"], config)
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
                and sha256_file(path) == rec["sha256"]):
            rec.setdefault("bytes", path.stat().st_size)  # journals before "bytes" existed
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
    skipped: Counter = Counter()
    for e in journal.entries:
        for reason, slices in (e.get("skipped") or {}).items():
            skipped[reason] += len(slices)
    modalities = Counter(e["modality"] or "unknown" for e in journal.entries
                         if e["outcome"] == "written")
    index = {
        "format": FORMAT,
        "medssl_version": __version__,
        "created": str(datetime.date.today().year),
        "shards": {r["shard"]: {"split": r["split"], "samples": r["samples"],
                                "sha256": r["sha256"], "bytes": r["bytes"]}
                   for r in sorted(journal.shards, key=lambda r: r["shard"])},
        "splits": {s: {"samples": samples[s], "patients": len(patients[s])} for s in patients},
        "inputs": {"seen": n_inputs, "written": outcomes["written"],
                   "quarantined": outcomes["quarantined"],
                   "quarantined_by_reason": dict(sorted(reasons.items())),
                   "skipped_slices_by_reason": dict(sorted(skipped.items()))},
        "labels": labels,
        "config": journal.config,
        "modalities": dict(sorted(modalities.items())),
    }
    if journal.config.get("attributes"):
        index["attributes"] = attributes_index(journal.entries, journal.config["attributes"])
    return index
