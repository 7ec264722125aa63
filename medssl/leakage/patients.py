"""Patient-level leakage guard: which patients a shard folder holds, and keyed hashes of them.

Two shard folders made with the same salt (same ``salt_id`` in their index.json) give one
patient the same pseudonym, so a benchmark can count the task's test patients that pretraining
saw, including a test patient's *other* images. The published dir cannot carry the pretraining
pseudonyms themselves (a list of them would link the weights to every other release holding
those pseudonyms), so ``medssl publish`` stores, per shard folder pretraining read, the set of
``HMAC-SHA256(nonce, pseudonym)`` (128 bits) with a public per-publish ``nonce``, sorted, in
``pretraining_patients.json`` (listed in SHA256SUMS). Whoever holds a pseudonym (that is, shards
of the same salt) can test it; nobody else learns anything but the count: pseudonyms are 64-bit
keyed hashes of the raw ids under a secret salt, so they cannot be enumerated, and a different
nonce per set of weights makes two published dirs' hashes unlinkable.

Reading patients touches only the small ``.json`` member of each sample (tar headers are
skipped over, images never decoded), so a million-image corpus is read at the speed of its
metadata.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medssl.data.shards import list_shards, read_index
from medssl.errors import MedsslError
from medssl.io import atomic_write_json
from medssl.published import PATIENTS, SUMS, sums_listing, verify_published

log = logging.getLogger(__name__)

FORMAT = "medssl-pretraining-patients/1"
FILE_NAME = PATIENTS
_DOMAIN = b"medssl/pretraining-patient/v1\x00"
_HASH_HEX = 32
HASH_WORDS = (f"HMAC-SHA256 keyed by the nonce (hex-decoded) of 'medssl/pretraining-patient/v1' "
              f"NUL + pseudonym, first {_HASH_HEX} hex digits")


def index_digest(folder: Path | str) -> str:
    """sha256 of a shard folder's index.json bytes: what the run record calls ``index_sha256``."""
    read_index(folder)          # a clear error for a missing or foreign folder
    return hashlib.sha256((Path(folder) / "index.json").read_bytes()).hexdigest()


def salt_of(folder: Path | str) -> str | None:
    """The ``config.salt_id`` of a shard folder's index.json (None when it records none)."""
    return ((read_index(folder).get("config") or {}).get("salt_id")) or None


def shard_patients(folder: Path | str, splits: Iterable[str]) -> dict[str, Counter[str]]:
    """Images per patient pseudonym, per split of ``folder``, from each sample's ``json`` member.

    ``splits`` absent from the folder give an empty count. Raises MedsslError naming a shard
    that cannot be read, or a sample without a patient pseudonym: a partial list would
    undercount an overlap.
    """
    index = read_index(folder)
    present = {info.get("split") for info in index["shards"].values()}
    out: dict[str, Counter[str]] = {}
    for split in splits:
        found: Counter[str] = Counter()
        if split in present:
            for shard in list_shards(folder, split):
                found.update(_tar_patients(Path(shard)))
        out[split] = found
    return out


def _tar_patients(path: Path) -> list[str]:
    found: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".json")):
                    continue
                handle = tar.extractfile(member)
                meta = json.loads(handle.read()) if handle is not None else {}
                patient = meta.get("patient") if isinstance(meta, dict) else None
                if not patient:
                    raise MedsslError(f"{path}: sample {member.name[:-5]!r} has no patient "
                                      "pseudonym; patient overlap cannot be counted")
                found.append(str(patient))
    except (OSError, tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedsslError(f"{path}: cannot read its samples' metadata ({type(exc).__name__}: "
                          f"{exc})") from None
    return found


def hash_patient(nonce: str, pseudonym: str) -> str:
    """The keyed hash of one pseudonym under a published nonce (hex)."""
    return hmac.new(bytes.fromhex(nonce), _DOMAIN + pseudonym.encode("utf-8"),
                    hashlib.sha256).hexdigest()[:_HASH_HEX]


def nonce_for(checkpoint_sha256: str) -> str:
    """The nonce of a publish: derived from the published checkpoint's digest, so re-publishing
    the same weights writes the same file, and other weights get another nonce."""
    return hashlib.sha256(b"medssl/patient-nonce/v1\x00" + checkpoint_sha256.encode()).hexdigest()[:32]


@dataclass
class HashedSource:
    """The patients of one shard folder pretraining read, as keyed hashes."""

    index_sha256: str
    salt_id: str
    split: str
    hashes: frozenset[str] = field(default_factory=frozenset)

    def seen(self, nonce: str, pseudonyms: Iterable[str]) -> set[str]:
        """The ``pseudonyms`` whose hash is in this source."""
        return {p for p in pseudonyms if hash_patient(nonce, p) in self.hashes}


@dataclass
class PatientHashes:
    """``pretraining_patients.json``: a nonce and one hashed patient set per source."""

    nonce: str
    sources: list[HashedSource]

    def for_salt(self, salt_id: str) -> list[HashedSource]:
        return [s for s in self.sources if s.salt_id == salt_id]


def hash_sources(nonce: str, sources: list[tuple[str, str, str, set[str]]]) -> PatientHashes:
    """``(index_sha256, salt_id, split, pseudonyms)`` per source -> their hashed form."""
    return PatientHashes(nonce, [HashedSource(d, s, sp, frozenset(hash_patient(nonce, p) for p in ps))
                                 for d, s, sp, ps in sources])


def write_hashes(path: Path, hashes: PatientHashes) -> None:
    """Write the sidecar (hashes sorted: their order says nothing about the shards)."""
    atomic_write_json(Path(path), {
        "format": FORMAT, "nonce": hashes.nonce, "hash": HASH_WORDS,
        "sources": [{"index_sha256": s.index_sha256, "salt_id": s.salt_id, "split": s.split,
                     "patients": len(s.hashes), "hashes": sorted(s.hashes)}
                    for s in hashes.sources]})


def read_hashes(path: Path) -> PatientHashes | None:
    """The sidecar at ``path``; None when absent; MedsslError when it is not one of ours."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        bytes.fromhex(data["nonce"])
        sources = [HashedSource(str(s["index_sha256"]), str(s["salt_id"]), str(s["split"]),
                                frozenset(str(h) for h in s["hashes"])) for s in data["sources"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MedsslError(f"{path}: not a medssl pretraining-patients file ({exc})") from None
    return PatientHashes(str(data["nonce"]), sources)


def published_hashes(directory: Path | str) -> PatientHashes | None:
    """The verified sidecar of a published dir; None when the publish wrote none.

    A sidecar that SHA256SUMS does not list is refused: anyone could have dropped it there.
    """
    directory = Path(directory)
    path = directory / FILE_NAME
    if not path.is_file():
        return None
    verify_published(directory)
    if FILE_NAME not in sums_listing(directory):
        raise MedsslError(f"{path}: not listed in {directory / SUMS}; it cannot be trusted "
                          "(re-publish the weights)")
    return read_hashes(path)
