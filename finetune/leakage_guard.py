"""Leakage guards of ``medssl finetune``: was a task's held-out data in an ssl init's pretraining?

Three levels, for every ``ssl:`` init and every shard task (MedMNIST tasks are not built from
shards: nothing to compare):

- **Split.** The published dir records what pretraining read (``pretraining_data``: split,
  index.json sha256, salt id, counts; medssl/publish.py copies it from the run record). The
  same index digest as the task's folder is the same corpus; if pretraining read its test or
  val split, the benchmark is refused before any work.
- **Patient.** Shards of the same salt id give a patient the same pseudonym, so the task's test
  and val patients are looked up among the pretraining patients: in the published dir's keyed
  hashes (``pretraining_patients.json``, medssl/leakage/patients.py), or, for weights without
  them, in a pretraining folder named in ``evaluation.pretraining_shards`` (matched by digest).
  A test patient counts when any of their images was read, not only the same image. More than
  zero refuses; a same-salt source that cannot be checked refuses too (it may hide an overlap).
- **Image** (``evaluation.leakage_check: true``): near-duplicates between the pretraining
  shards (the splits pretraining read) and the task's test and val images (``medssl.leakage``),
  recorded per task with its report (``leakage/<task>-<id>/leakage.md``). Never a refusal: on
  scan-like images the measured false-positive rate asks for a look, not a verdict.

``evaluation.allow_leakage: true`` turns the refusals into a note that every row of the
(task, init) carries (``CellRow.leakage``), and with it report.md and the model card.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import FinetuneRunConfig, TaskConfig
from medssl.errors import MedsslError
from medssl.init import Init
from medssl.results import CellRow

log = logging.getLogger(__name__)

HELD_OUT = ("test", "val")


@dataclass
class Source:
    """One entry of a published dir's ``pretraining_data``."""

    splits: list[str]
    index_sha256: str | None
    salt_id: str | None
    samples: int | None = None

    @classmethod
    def from_record(cls, entry: dict[str, Any]) -> Source:
        split = entry.get("split")
        return cls(splits=str(split).split("+") if split else [],
                   index_sha256=entry.get("index_sha256"), salt_id=entry.get("salt_id"),
                   samples=entry.get("samples"))


@dataclass
class Finding:
    """What the guards found for one (task, ssl init); ``record()`` is its results.json form."""

    task: str
    init: Init
    split_level: dict[str, Any]
    patient_level: dict[str, Any]
    image_level: dict[str, Any] = field(default_factory=lambda: {"status": "not requested"})
    pretraining_folders: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def leaked_splits(self) -> list[str]:
        return list(self.split_level.get("leaked", []))

    @property
    def refusal(self) -> str | None:
        """Why this (task, init) must not be benchmarked by default, in one sentence; or None."""
        label = self.init.label
        if self.leaked_splits:
            which = " and ".join(self.leaked_splits)
            return (f"tasks: {self.task}: init {label} was pretrained on this task's {which} "
                    f"split (the same shard folder: index.json sha256 "
                    f"{self.split_level['index_sha256'][:12]}); its {which} results would not be "
                    f"held out. Benchmark on data pretraining did not read, or set "
                    f"evaluation.allow_leakage: true to go on (every row and the card will say so)")
        p = self.patient_level
        if p.get("status") == "unchecked":
            return (f"tasks: {self.task}: the task's shards share salt id {p['salt_id']} with "
                    f"init {label}'s pretraining data, whose patients cannot be checked "
                    f"({p['reason']}); add that pretraining shard folder to "
                    f"evaluation.pretraining_shards, or set evaluation.allow_leakage: true")
        if p.get("status") == "checked" and (p["test"]["seen"] or p["val"]["seen"]):
            return (f"tasks: {self.task}: {_seen_words(p)} were seen in init {label}'s "
                    f"pretraining (same pseudonym salt {p['salt_id']}); its results would not be "
                    f"held out. Set evaluation.allow_leakage: true to go on anyway (every row and "
                    f"the card will say so)")
        return None

    @property
    def note(self) -> str:
        """The words a row carries when the benchmark went on despite a finding."""
        parts = []
        if self.leaked_splits:
            parts.append(f"pretraining of {self.init.label} read this task's "
                         f"{' and '.join(self.leaked_splits)} split")
        p = self.patient_level
        if p.get("status") == "checked" and (p["test"]["seen"] or p["val"]["seen"]):
            parts.append(f"{_seen_words(p)} were seen in pretraining")
        elif p.get("status") == "unchecked":
            parts.append(f"same pseudonym salt as pretraining, patients not checked ({p['reason']})")
        return "; ".join(parts)

    def record(self) -> dict[str, Any]:
        return {"init": str(self.init), "init_label": self.init.label,
                "split_level": self.split_level, "patient_level": self.patient_level,
                "image_level": self.image_level, "allowed_leakage": self.note}


def _seen_words(p: dict[str, Any]) -> str:
    t, v = p["test"], p["val"]
    words = (f"{t['seen']} of {t['of']} test patients ({t['images']} test images)")
    if v["seen"]:
        words += f" and {v['seen']} of {v['of']} val patients"
    return words


@dataclass
class SuiteGuard:
    """Every finding of a benchmark, by (task name, init); built before any work."""

    findings: dict[tuple[str, Init], Finding]
    allow: bool
    leakage_check: bool = False
    radius: int | None = None

    def note(self, task: str, init: Init) -> str:
        finding = self.findings.get((task, init))
        return finding.note if finding is not None and self.allow else ""

    def mark(self, task: str, rows: list[CellRow]) -> list[CellRow]:
        """The rows with their (task, init)'s leakage note (empty when none was found)."""
        import dataclasses

        return [dataclasses.replace(r, leakage=self.note(task, Init.parse(r.init))) for r in rows]

    def task_record(self, task: TaskConfig, out_dir: Path) -> dict[str, Any]:
        """results.json ``tasks.<name>.leakage``: one entry per ssl init; runs the image check
        (cached under ``out_dir/leakage``) when requested."""
        mine = [f for (name, _), f in self.findings.items() if name == task.name]
        if task.kind != "shards":
            return {"status": "not applicable: the task is not built from shards", "inits": []}
        if not mine:
            return {"status": "not applicable: no ssl init", "inits": []}
        if self.leakage_check:
            for finding in mine:
                finding.image_level = image_check(finding, task, out_dir, self.radius)
        return {"status": "checked", "inits": [f.record() for f in mine]}


def index_sha256(folder: str | Path) -> str:
    """sha256 of ``folder/index.json`` (what run records and published dirs call index_sha256)."""
    from medssl.leakage.patients import index_digest

    return index_digest(folder)


def preflight(cfg: FinetuneRunConfig) -> SuiteGuard:
    """Check every (shard task, ssl init) pair; raise MedsslError (one line) on a refusal.

    Reads the published dirs' records, the task folders' index.json and, where salts match,
    the patient pseudonyms of the task's test and val shards (json members only).
    """
    from medssl.leakage.patients import published_hashes, salt_of, shard_patients
    from medssl.published import read_published

    ev = cfg.evaluation
    ssl = [i for i in cfg.init_list if i.is_ssl]
    sources: dict[Init, list[Source]] = {}
    hashes = {}
    for init in ssl:
        published = read_published(init.path)
        sources[init] = [Source.from_record(e) for e in published.extra.get("pretraining_data") or []]
        hashes[init] = published_hashes(init.path)
    given: dict[str, str] = {}          # index digest -> a pretraining folder named in the config
    for folder in ev.pretraining_shards:
        digest = index_sha256(folder)
        if not any(s.index_sha256 == digest for init in ssl for s in sources[init]):
            raise MedsslError(f"evaluation.pretraining_shards: {folder}: its index.json (sha256 "
                              f"{digest[:12]}) is not a shard folder any ssl init's pretraining "
                              "read (see the card's 'Pretraining read' table); give the folders "
                              "pretraining read")
        given[digest] = folder
    if ev.leakage_check and not ssl:
        raise MedsslError("evaluation.leakage_check: no ssl: init to check; add one to inits or "
                          "drop leakage_check")
    findings: dict[tuple[str, Init], Finding] = {}
    pretraining_patients: dict[tuple[str, tuple[str, ...]], set[str]] = {}
    for task in cfg.tasks:
        if task.kind != "shards":
            continue
        digest, salt = index_sha256(task.path), salt_of(task.path)
        folders = {**given, digest: task.path}
        held_out: dict[str, Counter[str]] | None = None
        for init in ssl:
            same = [s for s in sources[init] if s.index_sha256 == digest]
            read = sorted({sp for s in same for sp in s.splits})
            split_level = {"status": "same corpus" if same else "other corpus",
                           "index_sha256": digest, "read": read,
                           "leaked": [s for s in HELD_OUT if s in read]}
            if not sources[init]:
                log.warning("%s: the published dir records no pretraining data; the leakage "
                            "guards cannot check task %s", init, task.name)
                split_level = {"status": "not recorded: the published dir says nothing of what "
                                         "pretraining read", "index_sha256": digest, "read": [],
                               "leaked": []}
            salted = [s for s in sources[init] if salt and s.salt_id == salt]
            if not salted:
                patient_level: dict[str, Any] = {
                    "status": "not applicable", "salt_id": salt,
                    "reason": "the task's shards and pretraining's use different pseudonym salts"
                    if salt else "the task's index.json records no salt id"}
            else:
                if held_out is None:
                    held_out = shard_patients(task.path, HELD_OUT)
                patient_level = _patients(salted, hashes[init], folders, held_out, salt,
                                          pretraining_patients)
            finding = Finding(task.name, init, split_level, patient_level)
            finding.pretraining_folders = [
                (folders[s.index_sha256], s.splits) for s in sources[init]
                if s.index_sha256 in folders]
            if ev.leakage_check and not finding.pretraining_folders:
                raise MedsslError(
                    f"evaluation.leakage_check: tasks: {task.name}: init {init.label}'s "
                    "pretraining shards are not reachable: add the folder pretraining read to "
                    "evaluation.pretraining_shards (index.json sha256 "
                    f"{', '.join((s.index_sha256 or '?')[:12] for s in sources[init]) or 'not recorded'})")
            refusal = finding.refusal
            if refusal and not ev.allow_leakage:
                raise MedsslError(refusal)
            if refusal:
                log.warning("going on despite leakage (evaluation.allow_leakage): %s", finding.note)
            findings[(task.name, init)] = finding
    return SuiteGuard(findings, ev.allow_leakage, ev.leakage_check, ev.leakage_radius)


def _patients(salted: list[Source], hashes, given: dict[str, str],
              held_out: dict[str, Counter[str]], salt: str, cache: dict) -> dict:
    """Test and val patients of the task seen in an init's same-salt pretraining sources
    (``hashes``: its published ``PatientHashes`` or None; ``cache``: pretraining patients read
    from folders, shared across tasks)."""
    from medssl.leakage.patients import shard_patients

    seen: dict[str, set[str]] = {s: set() for s in HELD_OUT}
    how = []
    for source in salted:
        hashed = next((h for h in (hashes.sources if hashes else [])
                       if h.index_sha256 == source.index_sha256 and h.salt_id == salt), None)
        if hashed is not None:
            for split in HELD_OUT:
                seen[split] |= hashed.seen(hashes.nonce, held_out[split])
            how.append("the published dir's patient hashes")
        elif source.index_sha256 in given:
            key = (source.index_sha256, tuple(source.splits))
            if key not in cache:
                counts = shard_patients(given[source.index_sha256], source.splits)
                cache[key] = set().union(*(set(c) for c in counts.values()))
            for split in HELD_OUT:
                seen[split] |= set(held_out[split]) & cache[key]
            how.append("the pretraining shards")
        else:
            return {"status": "unchecked", "salt_id": salt,
                    "reason": "the published dir carries no patient hashes for it and "
                              "evaluation.pretraining_shards does not name it"}
    return {"status": "checked", "salt_id": salt, "via": sorted(set(how)),
            **{split: {"seen": len(seen[split]), "of": len(held_out[split]),
                       "images": int(sum(held_out[split][p] for p in seen[split]))}
               for split in HELD_OUT}}


def image_check(finding: Finding, task: TaskConfig, out_dir: Path,
                radius: int | None) -> dict[str, Any]:
    """Near-duplicates between the init's pretraining shards and the task's test/val images,
    per pretraining folder; cached under ``out_dir/leakage`` (a resumed run reads it back)."""
    from medssl.leakage import (
        DEFAULT_RADIUS,
        compare,
        from_dict,
        hash_folder,
        to_dict,
        write_report,
    )
    from medssl.leakage.report import JSON_NAME, MD_NAME

    radius = DEFAULT_RADIUS if radius is None else radius
    task_digest = index_sha256(task.path)
    present = {i.get("split") for i in _index(task.path)["shards"].values()}
    splits = [s for s in HELD_OUT if s in present]
    entries = []
    for folder, read in finding.pretraining_folders:
        ident = hashlib.sha256(f"{task_digest} {index_sha256(folder)} {'+'.join(read)} "
                               f"{'+'.join(splits)} r{radius}".encode()).hexdigest()[:12]
        where = Path(out_dir) / "leakage" / f"{task.name}-{ident}"
        js = where / JSON_NAME
        if js.is_file():
            import json

            result = from_dict(json.loads(js.read_text()))
        else:
            pre = hash_folder(folder, splits=read, desc="hash pretrain")
            held = hash_folder(task.path, splits=splits, desc="hash task")
            result = compare(pre, held, radius)
            write_report(result, where)
        summary = to_dict(result)
        entries.append({"pretraining_splits": read, "task_splits": splits, "radius": result.radius,
                        "bits": result.bits, "pretrain_samples": result.pretrain_samples,
                        "task_samples": summary["task_samples"], "matched": summary["matched"],
                        "pairs_total": result.pairs_total, "leaked": result.leaked,
                        "report": str((where / MD_NAME).relative_to(out_dir))})
    return {"status": "checked", "folders": entries}


def _index(folder: str) -> dict:
    from medssl.data.shards import read_index

    return read_index(folder)


def report_lines(info: dict[str, Any]) -> list[str]:
    """report.md lines for one task's ``leakage`` record (empty when there is none)."""
    record = info.get("leakage")
    if not record or not record.get("inits"):
        return []
    lines = ["### Leakage checks", ""]
    for entry in record["inits"]:
        label, s, p, im = (entry["init_label"], entry["split_level"], entry["patient_level"],
                           entry["image_level"])
        if s["status"] == "same corpus":
            read = " and ".join(s["read"]) or "no split"
            split_words = (f"pretraining read this task's own shard folder ({read} split)"
                           + (f": its **{' and '.join(s['leaked'])} split was seen in "
                              "pretraining**" if s["leaked"] else
                              "; neither its test nor its val split"))
        elif s["status"] == "other corpus":
            split_words = "pretraining read other shard folders (index digests differ)"
        else:
            split_words = s["status"]
        if p["status"] == "checked":
            t, v = p["test"], p["val"]
            patient_words = (f"same pseudonym salt: {t['seen']} of {t['of']} test patients and "
                             f"{v['seen']} of {v['of']} val patients were seen in pretraining "
                             f"(checked against {' and '.join(p['via'])})")
        elif p["status"] == "unchecked":
            patient_words = f"same pseudonym salt, patients **not checked** ({p['reason']})"
        else:
            patient_words = f"patient overlap not applicable ({p['reason']})"
        lines.append(f"- {label}: {split_words}; {patient_words}.")
        if im.get("status") == "checked":
            for f in im["folders"]:
                matched = sum(f["matched"].values())
                total = sum(f["task_samples"].values())
                lines.append(f"  - Near-duplicate images (Hamming <= {f['radius']} of {f['bits']} "
                             f"bits, against the {'+'.join(f['pretraining_splits'])} split of "
                             f"{f['pretrain_samples']} pretraining images): {matched} of {total} "
                             f"{'/'.join(f['task_splits'])} images have at least one "
                             f"({f['pairs_total']} pairs); see [{f['report']}]({f['report']}), "
                             "which says how far the count can be trusted.")
        if entry.get("allowed_leakage"):
            lines.append(f"  - **Benchmarked anyway (evaluation.allow_leakage): "
                         f"{entry['allowed_leakage']}. This init's numbers on this task are not "
                         "held-out estimates.**")
    lines.append("")
    return lines
