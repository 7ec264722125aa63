"""Subgroup attributes (sex, age band, site, view, scanner): what is read and how it is coarsened.

Fine-tuning reports per-subgroup metrics and site shift from categorical, de-identified values
a sample's ``json`` holds under ``attributes`` (read back by ``medssl.sample.read_sample``); the
view is the contract's top-level ``view`` field, never duplicated under ``attributes``. They come
from two places, only when asked:

* a recipe's ``attributes:`` maps manifest columns (``AttributeSpec``; parsed here, called by
  ``medssl.data.recipes``);
* ``medssl shard --attributes sex,age,site,scanner`` (or a recipe's ``header_attributes``) reads
  DICOM header elements (``header_attributes``). A recipe column wins over the header.

Coarsening, the same for both paths (the allow-list of ``medssl.data.deid``):

* ``sex``: ``M``, ``F`` or ``O`` (a manifest may spell them Male/Female/Other, any case); any
  other value is absent. DICOM: PatientSex, exactly ``M``/``F``/``O``.
* ``age``: a band, never the years. Bands come from ``bins`` (default ``DEFAULT_AGE_BINS``):
  ``[0, 18, 40, 60, 80]`` gives ``0-17``, ``18-39``, ``40-59``, ``60-79``, ``80+``. Edges are
  whole years starting at 0, at least ``MIN_BAND_YEARS`` apart (a one-year band would be an
  exact age) and none above 90: HIPAA Safe Harbor groups every age of 90 and over, so the top
  band always absorbs them (bins with an edge above 90 are refused, not merged, so the bands a
  user reads are the bands asked for). A manifest cell is whole or fractional years (``58``,
  ``58.0``) or a DICOM age string (``058Y``); DICOM: PatientAge (``nnnD/W/M/Y``), else the whole
  years between PatientBirthDate and StudyDate. The dates themselves are never stored. A blank,
  non-numeric or implausible (below 0 or over ``MAX_PLAUSIBLE_AGE``) age leaves the attribute
  absent for that sample; absences are counted in index.json and the per-input report.
* ``site``: with ``pseudonym: true`` (and always from DICOM: InstitutionName + StationName) a
  salted HMAC under the corpus salt, ``site-<8 hex>`` (``deid.Pseudonymizer.site``); without it
  the value must already be a short code (``SHORT_VALUE``), else the recipe is refused.
* ``view``: upper-cased, spaces to ``_``, and kept only as a DICOM code string (``deid``'s rule).
* ``manufacturer``, ``model`` (``scanner``): Manufacturer, ManufacturerModelName; not
  identifying, but still cut to ``SHORT_VALUE``'s charset and length.

A manifest column holding more than ``MAX_DISTINCT`` distinct values is refused before any
shard is written (free text must not slip in as an "attribute"); age is banded first, so its
raw years do not count. Header values cannot be counted before reading; their distinct counts
are in index.json, with a warning past ``MAX_DISTINCT``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from itertools import pairwise
from typing import Any

from medssl.errors import ConfigError, MedsslError

#: Keys a sample json's ``attributes`` may hold; anything else never reaches a shard.
SAMPLE_ATTRIBUTE_KEYS = ("sex", "age", "site", "manufacturer", "model")
#: Names a recipe's ``attributes:`` may map (``view`` goes to the sample's top-level field).
RECIPE_ATTRIBUTES = ("sex", "age", "site", "view", "manufacturer", "model")
#: ``--attributes`` names -> what they record from DICOM headers.
HEADER_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "sex": ("sex",), "age": ("age",), "site": ("site",), "scanner": ("manufacturer", "model")}
MAX_DISTINCT = 50
DEFAULT_AGE_BINS = (0, 18, 40, 60, 80)
MAX_AGE_EDGE = 90
MIN_BAND_YEARS = 5
MAX_PLAUSIBLE_AGE = 120
#: The only shape a stored attribute value may take: short, no punctuation that marks free text.
SHORT_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+._ -]{0,31}")
_BAND = re.compile(r"(\d{1,2})-(\d{1,2})|(\d{1,2})\+")
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_DICOM_AGE = re.compile(r"(\d{3})([DWMY])")
_CODE = re.compile(r"[A-Z0-9_ ]{1,16}")


@dataclass(frozen=True)
class AgeBands:
    """Whole-year band edges; ``band(years)`` is the label of the band holding ``years``."""

    edges: tuple[int, ...] = DEFAULT_AGE_BINS

    @classmethod
    def parse(cls, value: Any, key: str) -> AgeBands:
        """Validated bands from a recipe's ``bins`` list; ConfigError naming ``key`` otherwise."""
        if value is None:
            return cls()
        if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key}: a list of at least 2 whole-year edges, e.g. "
                              f"{list(DEFAULT_AGE_BINS)}; got {value!r}")
        edges = tuple(value)
        if edges[0] != 0:
            raise ConfigError(f"{key}: the first edge must be 0 (every age needs a band), got "
                              f"{edges[0]}")
        for lo, hi in pairwise(edges):
            if hi - lo < MIN_BAND_YEARS:
                raise ConfigError(f"{key}: edges {lo} and {hi} are less than {MIN_BAND_YEARS} "
                                  "years apart (edges increase; a narrow band is nearly an "
                                  "exact age)")
        if edges[-1] > MAX_AGE_EDGE:
            raise ConfigError(f"{key}: edge {edges[-1]} is above {MAX_AGE_EDGE}; HIPAA Safe "
                              f"Harbor groups all ages of {MAX_AGE_EDGE} and over, so the top "
                              f"band must start at {MAX_AGE_EDGE} or below")
        return cls(edges)

    @property
    def labels(self) -> list[str]:
        """Band labels in age order: ``["0-17", ..., "80+"]``."""
        e = self.edges
        return [f"{lo}-{hi - 1}" for lo, hi in pairwise(e)] + [f"{e[-1]}+"]

    def band(self, years: float | None) -> str | None:
        """The band of an age in years (fractions count as the whole years lived)."""
        if years is None or not math.isfinite(years) or not 0 <= years <= MAX_PLAUSIBLE_AGE:
            return None
        whole = math.floor(years)
        below = [i for i, edge in enumerate(self.edges) if edge <= whole]
        return self.labels[below[-1]]


def parse_years(value: Any) -> float | None:
    """Age in years from a manifest cell (``58``, ``58.0``, ``'058Y'``), else None."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip().upper()
    match = _DICOM_AGE.fullmatch(text)
    if match:
        return dicom_age_years(text)
    try:
        years = float(text)
    except ValueError:
        return None
    return years if math.isfinite(years) else None


def dicom_age_years(value: Any) -> float | None:
    """Years from a DICOM Age String (``045Y``, ``006M``, ``010W``, ``003D``), else None."""
    match = _DICOM_AGE.fullmatch(str(value or "").strip().upper())
    if not match:
        return None
    n, unit = int(match.group(1)), match.group(2)
    return n / {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}[unit]


def _dicom_date(value: Any) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def years_between(birth: Any, on: Any) -> float | None:
    """Whole years lived from a DICOM birth date to a DICOM date (``YYYYMMDD``), else None."""
    b, d = _dicom_date(birth), _dicom_date(on)
    if b is None or d is None or d < b:
        return None
    return float(d.year - b.year - ((d.month, d.day) < (b.month, b.day)))


def sex_code(value: Any) -> str | None:
    """``M``/``F``/``O`` from a manifest spelling (M, Male, female, ...); else None."""
    return _SEX.get(str(value).strip().upper()) if value is not None else None


def view_code(value: Any) -> str | None:
    """A view as a DICOM code string (``Frontal`` -> ``FRONTAL``, ``AP`` -> ``AP``), else None."""
    if value is None:
        return None
    text = re.sub(r"\s+", "_", str(value).strip().upper())
    return text if _CODE.fullmatch(text) else None


def short_text(value: Any) -> str | None:
    """A scanner string cut to ``SHORT_VALUE``: other characters dropped, 32 characters kept."""
    if value is None:
        return None
    text = re.sub(r"[^A-Za-z0-9+._ -]", "", re.sub(r"\s+", " ", str(value)))
    text = re.sub(r" +", " ", text).strip(" +._-")[:32].strip()
    return text if text and SHORT_VALUE.fullmatch(text) else None


@dataclass(frozen=True)
class AttributeSpec:
    """One recipe ``attributes:`` entry: which manifest column feeds attribute ``name``."""

    name: str
    column: str
    bins: AgeBands | None = None     # age only
    pseudonym: bool = False          # site only: salted HMAC of the value

    def describe(self) -> dict[str, Any]:
        """For index.json's config: the column and the coarsening (no values)."""
        out: dict[str, Any] = {"column": self.column}
        if self.bins is not None:
            out["bins"] = list(self.bins.edges)
        if self.pseudonym:
            out["pseudonym"] = True
        return out


def parse_specs(tree: Any) -> dict[str, AttributeSpec]:
    """A recipe's ``attributes:`` mapping -> specs; ConfigError naming the key otherwise.

    Each value is a column name, or ``{column: NAME, bins: [...]}`` (age) or
    ``{column: NAME, pseudonym: true}`` (site).
    """
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"attributes: a mapping of attribute -> manifest column, got {tree!r}")
    specs: dict[str, AttributeSpec] = {}
    for name, value in tree.items():
        key = f"attributes.{name}"
        if name not in RECIPE_ATTRIBUTES:
            raise ConfigError(f"{key}: unknown attribute; choose from {', '.join(RECIPE_ATTRIBUTES)}")
        allowed = {"column"} | ({"bins"} if name == "age" else set()) | (
            {"pseudonym"} if name == "site" else set())
        if isinstance(value, str):
            value = {"column": value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: a column name or a mapping with keys "
                              f"{', '.join(sorted(allowed))}, got {value!r}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ConfigError(f"{key}: unknown key {unknown[0]!r}; valid keys here: "
                              f"{', '.join(sorted(allowed))}")
        column = value.get("column")
        if not isinstance(column, str) or not column.strip():
            raise ConfigError(f"{key}.column: name the manifest column, got {column!r}")
        pseudonym = value.get("pseudonym", False)
        if not isinstance(pseudonym, bool):
            raise ConfigError(f"{key}.pseudonym: true or false, got {pseudonym!r}")
        bins = AgeBands.parse(value.get("bins"), f"{key}.bins") if name == "age" else None
        specs[name] = AttributeSpec(name, column, bins, pseudonym)
    return specs


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def coarsen_column(spec: AttributeSpec, cells: list[Any], pseudo, where: str,
                   row_error: Callable[[int, str], Exception]) -> list[str | None]:
    """One manifest column's cells -> the stored value per row (None: absent).

    Raises MedsslError (``where`` names the file, column and recipe key) for a column with more
    than ``MAX_DISTINCT`` distinct values -- age excepted, whose bands are few whatever the raw
    years -- and ``row_error(row, message)`` for a plain site value that is not a short code.
    No cell value is ever quoted: it may name a person or a hospital.
    """
    if spec.name != "age":
        distinct = {str(c).strip() for c in cells if not _blank(c)}
        if len(distinct) > MAX_DISTINCT:
            raise MedsslError(f"{where} has {len(distinct)} distinct values, more than "
                              f"{MAX_DISTINCT}: an attribute must be a category, not free text "
                              "or an identifier")
    out: list[str | None] = []
    for i, cell in enumerate(cells):
        value: str | None = None
        if not _blank(cell):
            text = str(cell).strip()
            if spec.name == "age":
                value = (spec.bins or AgeBands()).band(parse_years(text))
            elif spec.name == "sex":
                value = sex_code(text)
            elif spec.name == "view":
                value = view_code(text)
            elif spec.name == "site" and spec.pseudonym:
                value = pseudo.site(text)
            elif spec.name == "site":
                if not SHORT_VALUE.fullmatch(text):
                    raise row_error(i, "site value is not a short code (not quoted: it may "
                                    "name a hospital); set attributes.site: {column: "
                                    f"{spec.column}, pseudonym: true}}")
                value = text
            else:
                value = short_text(text)
        out.append(value)
    return out


def parse_header_names(names: Any, key: str = "--attributes") -> tuple[str, ...]:
    """``"sex,age,site,scanner"`` (or a list) -> the stored names it records, in fixed order."""
    if names is None:
        return ()
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [str(n).strip() for n in items if str(n).strip()]
    bad = [n for n in items if n not in HEADER_ATTRIBUTES]
    if bad:
        raise ConfigError(f"{key}: unknown attribute {bad[0]!r}; valid: "
                          f"{', '.join(HEADER_ATTRIBUTES)}")
    wanted = {stored for n in items for stored in HEADER_ATTRIBUTES[n]}
    return tuple(n for n in SAMPLE_ATTRIBUTE_KEYS if n in wanted)


def header_attributes(header: Mapping[str, Any], wanted: tuple[str, ...], pseudo,
                      bins: AgeBands = AgeBands()) -> dict[str, str]:
    """Coarsened attributes from raw DICOM header strings (``dicom.read_dicom``'s
    ``extra["header"]``: PatientSex, PatientAge, PatientBirthDate, StudyDate, InstitutionName,
    StationName, Manufacturer, ManufacturerModelName). Only ``wanted`` names are looked at."""
    out: dict[str, str | None] = {}
    if "sex" in wanted:
        sex = str(header.get("PatientSex") or "").strip().upper()
        out["sex"] = sex if sex in ("M", "F", "O") else None
    if "age" in wanted:
        years = dicom_age_years(header.get("PatientAge"))
        if years is None:
            years = years_between(header.get("PatientBirthDate"), header.get("StudyDate"))
        out["age"] = bins.band(years)
    if "site" in wanted:
        parts = [str(header.get(k) or "").strip() for k in ("InstitutionName", "StationName")]
        out["site"] = pseudo.site(*parts) if any(parts) else None
    if "manufacturer" in wanted:
        out["manufacturer"] = short_text(header.get("Manufacturer"))
    if "model" in wanted:
        out["model"] = short_text(header.get("ManufacturerModelName"))
    return {k: v for k, v in out.items() if v is not None}


def attribute_problems(attributes: Any) -> list[str]:
    """What is wrong with a sample json's ``attributes`` (empty list = allowed)."""
    if not isinstance(attributes, Mapping):
        return ["attributes is not an object"]
    problems = []
    for name, value in sorted(attributes.items(), key=lambda kv: str(kv[0])):
        if name not in SAMPLE_ATTRIBUTE_KEYS:
            problems.append(f"attribute {name!r} is not one of {', '.join(SAMPLE_ATTRIBUTE_KEYS)}")
        elif not isinstance(value, str) or not SHORT_VALUE.fullmatch(value):
            problems.append(f"attribute {name!r} is not a short categorical value")
        elif name == "age" and not _is_band(value):
            problems.append("attribute 'age' is not an age band of at least "
                            f"{MIN_BAND_YEARS} years")
    return problems


def _is_band(value: str) -> bool:
    match = _BAND.fullmatch(value)
    if not match:
        return False
    if match.group(3) is not None:
        return int(match.group(3)) <= MAX_AGE_EDGE
    lo, hi = int(match.group(1)), int(match.group(2))
    return hi - lo + 1 >= MIN_BAND_YEARS and hi < MAX_AGE_EDGE


def band_order(name: str, values: list[str]) -> list[str]:
    """Values sorted for display: age bands by their lower edge, others alphabetically."""
    if name != "age":
        return sorted(values)
    return sorted(values, key=lambda v: int(re.match(r"\d+", v).group()) if v[:1].isdigit() else 999)


__all__ = [
    "DEFAULT_AGE_BINS",
    "HEADER_ATTRIBUTES",
    "MAX_DISTINCT",
    "RECIPE_ATTRIBUTES",
    "SAMPLE_ATTRIBUTE_KEYS",
    "AgeBands",
    "AttributeSpec",
    "attribute_problems",
    "band_order",
    "coarsen_column",
    "header_attributes",
    "parse_header_names",
    "parse_specs",
    "parse_years",
    "sex_code",
    "short_text",
    "view_code",
    "years_between"
]
