"""``medssl shards verify DIR``: re-check a shard folder against its index.json.

A shard folder is copied to clusters and shared, so before training on it (or publishing a
model card that cites it) this recomputes what the writer promised: every listed shard exists
with its recorded size (``bytes``, absent from indexes older than that field) and hashes to
its recorded sha256, holds the recorded number of samples and only its own split,
carries only allowed members (``img.png``, ``json``, ``cls``; ``vol.npy.gz`` instead of
``img.png`` in a ``--volumes`` folder, each one decoded and its ``spacing`` checked) with
allow-listed metadata (and
``attributes`` holding only known names with short categorical values, ages as bands), no
unlisted shard lies beside them, per-split counts add up, and no patient is in two splits.

Members are read with ``tarfile`` directly rather than WebDataset because the check is about
the exact member names (a ``.pth`` member must be reported, not decoded or skipped).
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

from medssl.data.attributes import attribute_problems
from medssl.data.sample import SAMPLE_META_KEYS, VOLUME_MEMBER, decode_volume
from medssl.data.shards import read_index
from medssl.io import sha256_file

log = logging.getLogger(__name__)

ALLOWED_MEMBERS = ("img.png", "json", "cls", VOLUME_MEMBER)


def _check_shard(path: Path, split: str, patients: dict[str, dict[str, str]],
                 keys: set[str], volumes: bool = False) -> tuple[int, list[str]]:
    """(sample count, problems) of one shard; records its patients per split in ``patients``.
    ``volumes``: the folder's index says ``--volumes``, so samples hold ``vol.npy.gz``."""
    name = path.name
    image, other = (VOLUME_MEMBER, "img.png") if volumes else ("img.png", VOLUME_MEMBER)
    problems: list[str] = []
    samples: dict[str, set[str]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    problems.append(f"{name}: member {member.name!r} is not a regular file")
                    continue
                key, _, ext = member.name.partition(".")
                if ext not in ALLOWED_MEMBERS or ext == other or "/" in member.name:
                    allowed = [m for m in ALLOWED_MEMBERS if m != other]
                    problems.append(f"{name}: member {member.name!r} is not one of "
                                    f"{', '.join(allowed)}")
                    continue
                if key not in samples:
                    samples[key] = set()
                    order.append(key)
                samples[key].add(ext)
                if ext == "json":
                    problems += _check_meta(name, key, tar.extractfile(member).read(), split,
                                            patients, volumes)
                elif ext == VOLUME_MEMBER:
                    try:  # gunzip + .npy header, never unpickling: the loader's own decode
                        decode_volume(tar.extractfile(member).read())
                    except Exception as exc:
                        problems.append(f"{name}: sample {key} {VOLUME_MEMBER} does not decode "
                                        f"({type(exc).__name__})")
    except (tarfile.TarError, OSError, EOFError) as exc:
        return len(order), [*problems, f"{name}: unreadable tar ({type(exc).__name__}: {exc})"]
    for key in order:
        missing = {image, "json"} - samples[key]
        if missing:
            problems.append(f"{name}: sample {key} lacks {', '.join(sorted(missing))}")
        if key in keys:
            problems.append(f"{name}: sample key {key} appears in more than one place")
        keys.add(key)
    return len(order), problems


def _check_meta(name: str, key: str, raw: bytes, split: str,
                patients: dict[str, dict[str, str]], volumes: bool = False) -> list[str]:
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [f"{name}: sample {key} has a json member that is not valid JSON"]
    if not isinstance(meta, dict):
        return [f"{name}: sample {key} json is not an object"]
    problems = []
    extra = sorted(set(meta) - set(SAMPLE_META_KEYS))
    if extra:
        problems.append(f"{name}: sample {key} json has keys outside the allow-list: {extra}")
    if "attributes" in meta:
        problems += [f"{name}: sample {key} json {p}" for p in attribute_problems(meta["attributes"])]
    if volumes:
        spacing = meta.get("spacing")
        if not (isinstance(spacing, list) and len(spacing) == 3
                and all(isinstance(v, (int, float)) and v > 0 for v in spacing)):
            problems.append(f"{name}: sample {key} json has no spacing of three positive mm")
    patient = meta.get("patient")
    if not isinstance(patient, str) or not patient:
        problems.append(f"{name}: sample {key} json has no patient pseudonym")
    else:
        patients.setdefault(patient, {}).setdefault(split, name)
    return problems


def verify_shards(directory: Path) -> list[str]:
    """Human-readable problems of a shard folder, each naming the shard (empty list = OK).

    Raises MedsslError when the folder or its index.json is missing or unreadable.
    """
    directory = Path(directory)
    index = read_index(directory)
    problems: list[str] = []
    listed = index.get("shards") or {}
    patients: dict[str, dict[str, str]] = {}   # patient -> split -> first shard seen in
    keys: set[str] = set()
    per_split: Counter = Counter()
    volumes = bool((index.get("config") or {}).get("volumes"))
    for name in sorted(listed):
        info = listed[name]
        split = info.get("split")
        path = directory / name
        if not name.startswith(f"{split}-") or not name.endswith(".tar"):
            problems.append(f"{name}: listed as split {split!r} but named for another split")
        if not path.is_file():
            problems.append(f"{name}: listed in index.json but missing")
            continue
        size = info.get("bytes")  # indexes written before medssl recorded sizes have none
        if size is not None and path.stat().st_size != size:
            problems.append(f"{name}: {path.stat().st_size} bytes, index.json says {size}")
        if sha256_file(path) != info.get("sha256"):
            problems.append(f"{name}: sha256 differs from index.json (file changed or corrupt)")
        count, shard_problems = _check_shard(path, split, patients, keys, volumes)
        problems += shard_problems
        if count != info.get("samples"):
            problems.append(f"{name}: holds {count} samples, index.json says {info.get('samples')}")
        per_split[split] += count
    for path in sorted(directory.iterdir()):
        if path.name.endswith((".tar", ".tar.tmp")) and path.name not in listed:
            problems.append(f"{path.name}: shard file not listed in index.json")
    splits = index.get("splits") or {}
    for split in sorted(set(splits) | set(per_split)):
        recorded = (splits.get(split) or {}).get("samples", 0)
        if recorded != per_split[split]:
            problems.append(f"split {split}: index.json says {recorded} samples, its shards hold "
                            f"{per_split[split]}")
        n_patients = sum(1 for by_split in patients.values() if split in by_split)
        recorded_patients = (splits.get(split) or {}).get("patients", 0)
        if recorded_patients != n_patients:
            problems.append(f"split {split}: index.json says {recorded_patients} patients, its "
                            f"shards hold {n_patients}")
    for patient, by_split in sorted(patients.items()):
        if len(by_split) > 1:
            where = ", ".join(f"{s} ({shard})" for s, shard in sorted(by_split.items()))
            problems.append(f"patient {patient} is in more than one split: {where}")
    return problems


def verify_command(directory: Path) -> int:
    """Run ``medssl shards verify``: 0 and a one-line summary when sound, else 1."""
    problems = verify_shards(Path(directory))
    if problems:
        for problem in problems:
            log.error("%s: %s", directory, problem)
        log.error("%s: %d problems found", directory, len(problems))
        return 1
    index = read_index(directory)
    splits = " / ".join(f"{s} {v['samples']}" for s, v in index["splits"].items())
    # The command's one result line; stdout so scripts can capture it.
    print(f"OK: {directory}: {sum(v['samples'] for v in index['splits'].values())} samples in "
          f"{len(index['shards'])} shards ({splits}); checksums, counts, members and "
          "patient-disjoint splits verified")
    return 0
