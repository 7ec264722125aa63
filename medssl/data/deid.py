"""De-identification: salted pseudonyms and the metadata allow-list every sample goes through.

What a shard keeps is an allow-list, not a scrubbed copy of the header: ``sample_metadata``
builds each sample's ``json`` from a handful of typed fields (modality, body part, view,
pixel spacing, slice index, channel count, intensity encoding, window, label) plus
pseudonyms, and, only when a recipe's ``attributes:`` or ``medssl shard --attributes`` asks,
coarsened subgroup ``attributes``. Nothing else from a source file can reach a shard, whatever
the file holds.

Subgroup attributes (``medssl.data.attributes`` holds the rules; ``attribute_problems`` is
checked again here and by ``medssl shards verify``):

* read from DICOM headers only when asked (``--attributes sex,age,site,scanner``): PatientSex
  (kept only as ``M``/``F``/``O``); PatientAge, or PatientBirthDate and StudyDate when it is
  absent, turned into an age BAND (default ``0-17``, ``18-39``, ``40-59``, ``60-79``, ``80+``;
  the top band always absorbs 90+, per Safe Harbor) -- neither the years nor a date is stored;
  InstitutionName + StationName, stored only as a salted pseudonym ``site-<8 hex>``;
  Manufacturer and ManufacturerModelName (scanner, not identifying), cut to 32 characters of
  ``[A-Za-z0-9+._ -]``;
* read from manifest columns a recipe names: the same coarsening (a site column with
  ``pseudonym: true`` becomes ``site-<8 hex>``), and a column with more than 50 distinct values
  is refused before any shard is written, so free text cannot pass as a category.

Coverage against DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile) and
HIPAA Safe Harbor (45 CFR 164.514(b)(2)):

* patient identity and demographics (name, ID, birth date, address, phone, insurance, other
  IDs; sex and age unless asked for, then coarsened as above), personnel and institution names
  (a site is stored only as a pseudonym), accession and request numbers,
  device serials, all dates and times, free-text descriptions and comments, private
  attributes, and NIfTI ``descrip``/``aux_file``/``db_name``/extensions and PNG/TIFF/EXIF
  text: removed, by never being copied;
* patient, study and series identifiers: replaced consistently by keyed pseudonyms
  (HMAC-SHA256 under a secret salt kept beside, never inside, the shard folder); without the
  salt a pseudonym cannot be linked back to, or recomputed from, a guessed MRN or UID;
  SOP Instance UIDs and source paths are not stored at all (sample keys are pseudonyms too);
* modality/body-part/view strings pass only when they look like DICOM code strings
  (upper case ``[A-Z0-9_ ]``, at most 16 characters); anything else becomes null, so free
  text put in those fields cannot ride along.

Not covered, and to be stated wherever the data or weights are shared:

* text burned into the pixels. The readers quarantine images flagged BurnedInAnnotation=YES,
  secondary captures and unflagged ultrasound (``--allow-burned-in`` overrides), but an
  unflagged radiograph with a printed name passes: no OCR or pixel cleaning is done;
* faces: head CT/MR volumes can be rendered into a recognisable face; no defacing is done;
* the images themselves (rare anatomy, implants) and the patient-level linkage pseudonyms
  provide, which is what makes this pseudonymisation rather than anonymisation under GDPR;
* the combination of coarse attributes (site pseudonym, sex, age band) narrows who a sample
  could be, most for small sites and the top age band; they are asked for, never default;
* identifiers typed into the allow-listed fields in a code-like form (e.g. a BodyPartExamined
  of ``SMITH``) are indistinguishable from codes and would pass.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medssl.data.attributes import attribute_problems
from medssl.data.sample import SAMPLE_META_KEYS, Slice
from medssl.errors import MedsslError

log = logging.getLogger(__name__)

SALT_ENV = "MEDSSL_SALT"
MIN_SALT_BYTES = 16
#: DICOM code-string shape: the only form modality/body part/view may take in a shard.
CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")


def _salt_path_for(shard_dir: Path) -> Path:
    folder = Path(shard_dir).expanduser().resolve()
    return folder.parent / f"{folder.name}.salt"


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).expanduser().resolve().relative_to(Path(folder).expanduser().resolve())
        return True
    except ValueError:
        return False


def _checked(salt: bytes, where: str) -> bytes:
    if len(salt) < MIN_SALT_BYTES:
        raise MedsslError(
            f"{where}: salt is {len(salt)} bytes; use at least {MIN_SALT_BYTES} random bytes "
            "(e.g. `head -c 32 /dev/urandom > FILE`)"
        )
    return salt


def resolve_salt(salt_file: Path | None, shard_dir: Path) -> tuple[bytes, Path | None]:
    """The secret behind every pseudonym of a shard folder, found without writing anything.

    Returns ``(salt, new_path)``. Order: ``salt_file`` if given (must exist and hold >= 16
    bytes; a trailing newline is ignored), else the ``MEDSSL_SALT`` environment variable,
    else ``<shard_dir>.salt`` beside the shard folder. When none exists, a fresh 32-byte salt
    comes back with ``new_path`` set: the caller saves it with ``save_salt`` once the run is
    known to go ahead, so a refused run leaves no stray salt file behind. The salt never
    lives inside the shard folder, because that folder is what gets copied and shared;
    whoever holds the salt can recompute a patient's pseudonym from their ID. Reuse one salt
    across shard runs that must agree on pseudonyms (e.g. a new batch of the same cohort).
    """
    if salt_file is not None:
        salt_file = Path(salt_file)
        if _inside(salt_file, shard_dir):
            raise MedsslError(
                f"{salt_file}: the salt file must not be inside the shard folder {shard_dir} "
                "(that folder gets shared); move it beside the folder"
            )
        if not salt_file.is_file():
            raise MedsslError(f"{salt_file}: salt file not found; create it or drop --salt-file")
        return _checked(salt_file.read_bytes().rstrip(b"\r\n"), str(salt_file)), None
    env = os.environ.get(SALT_ENV)
    if env:
        return _checked(env.encode("utf-8"), f"environment variable {SALT_ENV}"), None
    path = _salt_path_for(shard_dir)
    if path.is_file():
        return _checked(path.read_bytes(), str(path)), None
    return os.urandom(32), path


def save_salt(path: Path, salt: bytes) -> None:
    """Write a new salt from ``resolve_salt`` (mode 0600); never replaces an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two concurrent runs must not each write a different salt.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.read_bytes() == salt:
            return
        raise MedsslError(f"{path}: another run created this salt file meanwhile; re-run "
                          "to use it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(salt)
    log.info("created salt %s (keep it private; reuse it to get the same pseudonyms)", path)


def load_or_create_salt(salt_file: Path | None, shard_dir: Path) -> bytes:
    """``resolve_salt``, saving a new salt at once (for callers with nothing to check first)."""
    salt, new_path = resolve_salt(salt_file, shard_dir)
    if new_path is not None:
        try:
            save_salt(new_path, salt)
        except MedsslError:  # another process created it first: use theirs
            pass
        return _checked(new_path.read_bytes(), str(new_path))
    return salt


def salt_id(salt: bytes) -> str:
    """First 12 hex digits of sha256(salt): names which salt was used, reveals nothing of it."""
    return hashlib.sha256(salt).hexdigest()[:12]


class Pseudonymizer:
    """Keyed, stable pseudonyms: the same raw id and salt always give the same string.

    Each kind of identifier has its own HMAC domain, so a patient id and a study UID with the
    same text never map to the same pseudonym.
    """

    def __init__(self, salt: bytes) -> None:
        if not isinstance(salt, (bytes, bytearray)) or len(salt) < MIN_SALT_BYTES:
            raise ValueError(f"salt must be at least {MIN_SALT_BYTES} bytes")
        self._key = bytes(salt)

    def _digest(self, domain: str, *parts: str) -> str:
        # NUL separators: ("ab", "c") and ("a", "bc") must not collide. surrogateescape: a
        # file name that is not valid UTF-8 reaches Python as lone surrogates, and hashes as
        # its original bytes (valid text encodes exactly as UTF-8).
        message = "\x00".join((domain, *parts)).encode("utf-8", "surrogateescape")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def patient(self, raw: str) -> str:
        """``"p-<16 hex>"`` for a raw patient identifier (surrounding spaces ignored)."""
        text = str(raw).strip()
        if not text:
            raise ValueError("empty patient identifier")
        return "p-" + self._digest("medssl/patient/v1", text)[:16]

    def study(self, raw: str | None) -> str | None:
        """``"s-<16 hex>"`` for a study UID, None when there is none."""
        text = str(raw).strip() if raw is not None else ""
        return "s-" + self._digest("medssl/study/v1", text)[:16] if text else None

    def series(self, raw: str | None) -> str | None:
        """``"r-<16 hex>"`` for a series UID, None when there is none."""
        text = str(raw).strip() if raw is not None else ""
        return "r-" + self._digest("medssl/series/v1", text)[:16] if text else None

    def site(self, *parts: str) -> str:
        """``"site-<8 hex>"`` for a site name (e.g. InstitutionName and StationName): short,
        because a corpus has a few sites and users name them in configs (``evaluation.shift``)."""
        text = [str(p).strip() for p in parts]
        if not any(text):
            raise ValueError("empty site name")
        return "site-" + self._digest("medssl/site/v1", *text)[:8]

    def sample_key(self, patient_pseudo: str, source_identity: str, index: int) -> str:
        """WebDataset key ``"<patient pseudonym>-<12 hex>"``: unique per (source, index).

        Only ``[a-z0-9-]``, so it is a valid key (no dots, no slashes) and sorts by patient.
        ``source_identity`` (a path or SOP Instance UID) enters only the keyed hash.
        """
        digest = self._digest("medssl/sample/v1", patient_pseudo, str(source_identity), str(int(index)))
        return f"{patient_pseudo}-{digest[:12]}"


def _code(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    return text if CODE_STRING.fullmatch(text) else None


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _spacing(value: Any) -> list[float] | None:
    try:
        row, col = (_finite(v) for v in value)
    except (TypeError, ValueError):
        return None
    if row is None or col is None or row <= 0 or col <= 0:
        return None
    return [row, col]


def _label(value: Any) -> int | list[int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else list(value)
        if isinstance(items, list):
            return [int(v) for v in items]
        return int(items)
    return int(value)


def sample_metadata(
    s: Slice, pseudo: Pseudonymizer, intensity: Mapping[str, float] | None = None
) -> dict:
    """The sample's ``json``: keys of ``SAMPLE_META_KEYS`` only, plain JSON types only.

    ``intensity`` is ``{"offset": ..., "slope": ...}`` from ``sample.encode_intensity``
    (the writer knows it; RGB samples have none); ``unit`` is taken from the slice.
    ``label`` appears only when the slice has one. Raw ids become pseudonyms here.
    """
    window = None
    if s.window is not None:
        center, width = (_finite(v) for v in s.window)
        if center is not None and width is not None and width > 0:
            window = {"center": center, "width": width}
    encoded = None
    if intensity is not None:
        offset, slope = _finite(intensity.get("offset")), _finite(intensity.get("slope"))
        if offset is None or slope is None:
            raise ValueError(f"intensity needs finite offset and slope, got {dict(intensity)}")
        encoded = {"offset": offset, "slope": slope, "unit": "HU" if s.unit == "HU" else None}
    slice_index = None
    if s.slice_index is not None and _finite(s.slice_index) is not None:
        slice_index = int(s.slice_index)
    meta: dict[str, Any] = {
        "modality": _code(s.modality),
        "body_part": _code(s.body_part),
        "view": _code(s.view),
        "pixel_spacing": _spacing(s.pixel_spacing) if s.pixel_spacing is not None else None,
        "slice_index": slice_index,
        "patient": pseudo.patient(s.patient_id),
        "study": pseudo.study(s.study_id),
        "series": pseudo.series(s.series_id),
        "channels": int(s.channels),
        "intensity": encoded,
        "window": window,
    }
    if s.spacing is not None:   # a volume: its voxel size is what training resamples by
        spacing = [_finite(v) for v in s.spacing]
        if len(spacing) != 3 or any(v is None or v <= 0 for v in spacing):
            raise ValueError(f"volume spacing must be three positive mm values, got {s.spacing}")
        meta["spacing"] = spacing
    label = _label(s.label)
    if label is not None:
        meta["label"] = label
    if s.attributes:
        problems = attribute_problems(s.attributes)
        if problems:  # coarsening happens before; a raw value here is a bug: refuse, not leak
            raise ValueError(f"sample attributes not coarsened: {problems[0]}")
        meta["attributes"] = dict(sorted(s.attributes.items()))
    assert set(meta) <= set(SAMPLE_META_KEYS), sorted(set(meta) - set(SAMPLE_META_KEYS))
    return meta
