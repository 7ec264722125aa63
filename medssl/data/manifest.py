"""Reading a recipe's manifest: one ``ManifestEntry`` per row, with errors that name the row.

``medssl.data.recipes`` holds the recipe (what the YAML says); this module holds what reading a
CSV/parquet manifest with it takes: the table, the required columns, official split lists,
label values, finding masks and the ``attributes:`` columns (coarsened by
``medssl.data.attributes``). ``Recipe.manifest_entries`` is the one caller.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# The recipe types, named for the signatures only: medssl.data.recipes imports this module, so
# importing them back would close a circle (tests/test_layers.py forbids it).
Recipe = Any      # medssl.data.recipes.Recipe
LabelSpec = Any   # medssl.data.recipes.LabelSpec


@dataclass
class ManifestEntry:
    """One manifest row: an image file, its patient, label and official split.

    ``patient_id`` is the raw identifier from the manifest (the shard writer pseudonymises it).
    ``label`` is an ``int`` class, a ``list[int]`` of 0/1 per name, or None. ``slice`` is the
    slice index inside a volume file when the recipe has ``slice_column`` (one label per
    slice); None means the label applies to the whole file. ``row`` is the 0-based data row in
    ``manifest``. ``quarantine`` names why the row cannot be written (``missing_file``,
    ``uncertain_label``); such rows must be reported, not written. ``attributes`` holds the
    recipe's ``attributes:`` already coarsened (bands, pseudonyms; ``view`` as a code string);
    an attribute whose cell gave no usable value is absent.
    """

    path: Path
    patient_id: str
    label: int | list[int] | None
    split: str | None
    row: int
    slice: int | None = None
    mask: Path | None = None        # recipe ``masks``: the finding-mask file; None: none
    manifest: Path | None = None
    quarantine: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)


def resolve(base: Path, rel: str | Path) -> Path:
    p = Path(rel).expanduser()
    return p if p.is_absolute() else base / p


def is_blank(value: Any) -> bool:
    """True for empty cells: None, NaN, or a string of whitespace."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


class _Rows:
    """Error messages that point at one manifest row (and line, for CSV)."""

    def __init__(self, recipe: Recipe, manifest: Path) -> None:
        self.recipe, self.manifest = recipe, manifest

    def error(self, row: int, column: str, message: str) -> MedsslError:
        line = f" (line {row + 2})" if self.recipe.format == "csv" else ""
        return MedsslError(f"{self.manifest}: row {row}{line}, column {column!r}: {message}")


def _read_table(recipe: Recipe, path: Path):
    import pandas as pd  # lazy: `medssl shards verify` and friends should not pay for pandas

    if not path.is_file():
        raise MedsslError(
            f"{recipe.source or recipe.name}: manifest {path} not found (a relative manifest: "
            "is read from the first INPUT folder)"
        )
    try:
        if recipe.format == "parquet":
            return pd.read_parquet(path)
        # Strings throughout: blanks stay blanks and '1.0' vs '1' is ours to judge.
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, ImportError) as exc:  # parser and arrow errors are ValueErrors
        raise MedsslError(f"{path}: cannot read as {recipe.format} ({exc})") from None


def _required_columns(recipe: Recipe) -> dict[str, str]:
    """Manifest column -> the recipe key that names it."""
    cols = {recipe.image_column: "image_column"}
    for key in ("patient_column", "slice_column", "split_column"):
        if getattr(recipe, key):
            cols[getattr(recipe, key)] = key
    if recipe.labels is not None:
        if recipe.labels.source_column:
            cols[recipe.labels.source_column] = "labels.source_column"
        for c in recipe.labels.columns:
            cols[c] = "labels.columns"
    for name, spec in recipe.attribute_specs.items():
        cols.setdefault(spec.column, f"attributes.{name}")
    return cols


def _read_split_lists(recipe: Recipe, folder: Path) -> dict[str, str]:
    """Image file name -> split, from text files of one name per line (NIH's official lists)."""
    found: dict[str, str] = {}
    for split, rel in (recipe.split_lists or {}).items():
        path = resolve(folder, rel)
        if not path.is_file():
            raise MedsslError(f"{recipe.source}: split_lists.{split}: {path} not found "
                              "(relative to the manifest's folder)")
        for line, name in enumerate(path.read_text().splitlines(), start=1):
            name = name.strip()
            if name and found.setdefault(name, split) != split:
                # The name is not quoted: file names can hold patient names.
                raise MedsslError(f"{path}: line {line} names an image that is also in the "
                                  f"{found[name]} list; an image belongs to one split")
    return found


def _short(value: Any) -> str:
    """A cell value quoted for an error message, cut short: cells are not meant to hold text."""
    text = str(value)
    return repr(text if len(text) <= 24 else text[:21] + "...")


def _as_id(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_entries(recipe: Recipe, manifest: Path, root: Path, split: str | None,
                  check_files: bool, pseudo=None, folders: bool = False) -> list[ManifestEntry]:
    table = _read_table(recipe, manifest)
    missing = {c: k for c, k in _required_columns(recipe).items() if c not in table.columns}
    if missing:
        col, key = next(iter(missing.items()))
        raise MedsslError(
            f"{manifest}: no column {col!r} (recipe {recipe.source or recipe.name}, key {key}); "
            f"columns are {', '.join(map(str, table.columns[:30]))}"
        )
    rows = _Rows(recipe, manifest)
    lists = _read_split_lists(recipe, manifest.parent) if recipe.split_lists else None
    to_split = {str(v): k for k, v in (recipe.split_values or {}).items()}
    pattern = re.compile(recipe.patient_pattern) if recipe.patient_pattern else None
    col = {c: table[c].tolist() for c in _required_columns(recipe)}
    attrs = manifest_attributes(recipe, manifest, col, pseudo)
    entries = []
    for i, raw in enumerate(col[recipe.image_column]):
        if is_blank(raw):
            raise rows.error(i, recipe.image_column, "no image path")
        raw = str(raw).strip()
        path = resolve(root, raw)
        patient: str | None = None
        if recipe.patient_column:
            value = col[recipe.patient_column][i]
            if is_blank(value):
                raise rows.error(i, recipe.patient_column, "no patient id (splits are by patient)")
            patient = _as_id(value)
        elif pattern is not None:
            match = pattern.search(Path(raw).as_posix())
            if not match:
                raise rows.error(i, recipe.image_column,
                                 f"patient_pattern {recipe.patient_pattern!r} does not match "
                                 "the path (not quoted: paths can hold names)")
            patient = match.group(1)
        row_split = split
        if recipe.split_column:
            value = col[recipe.split_column][i]
            if not is_blank(value):
                value = _as_id(value)
                row_split = to_split.get(value, value if value in SPLITS else None)
                if row_split is None:
                    raise rows.error(i, recipe.split_column,
                                     f"split value {_short(value)} is not mapped; add it to "
                                     "split_values")
        elif lists is not None:
            row_split = lists.get(Path(raw).name, lists.get(raw))
        slice_index = None
        if recipe.slice_column:
            slice_index = _whole(rows, i, recipe.slice_column, col[recipe.slice_column][i])
            if slice_index is None or slice_index < 0:
                raise rows.error(i, recipe.slice_column, "slice index must be a whole number >= 0")
        label, reason = (None, None)
        if recipe.labels is not None:
            label, reason = _label(recipe.labels, rows, i, col)
        if reason is None and check_files and not (path.is_file() or (folders and path.is_dir())):
            reason = "missing_file"
        entries.append(ManifestEntry(path=path, patient_id=patient, label=label, split=row_split,
                                     row=i, slice=slice_index, manifest=manifest,
                                     quarantine=reason, attributes=attrs[i]))
    return entries


def read_masks(recipe: Recipe, manifest: Path, root: Path, entries: list[ManifestEntry]) -> None:
    """Set ``entry.mask`` from the ``masks`` column (resolved like image paths; blank: None).

    Apart from ``read_entries`` because masks are wanted by one command only; whether a mask
    can be read is the worker's question (``bad_mask``), asked only when masks are written.
    """
    table = _read_table(recipe, manifest)
    if recipe.masks not in table.columns:
        raise MedsslError(
            f"{manifest}: no column {recipe.masks!r} (recipe {recipe.source or recipe.name}, key "
            f"masks); columns are {', '.join(map(str, table.columns[:30]))}"
        )
    for entry, value in zip(entries, table[recipe.masks].tolist()):
        entry.mask = None if is_blank(value) else resolve(root, str(value).strip())
def pseudonymizer(salt: bytes):
    from medssl.data.deid import Pseudonymizer

    return Pseudonymizer(salt)


def manifest_attributes(recipe: Recipe, manifest: Path, col: dict[str, list],
                        pseudo) -> list[dict[str, str]]:
    """Per row, the coarsened ``attributes:`` values (absent where a cell gives none); refusals
    and coarsening are ``attributes.coarsen_column``'s. Absences are logged as counts only."""
    from medssl.data.attributes import coarsen_column

    n = len(col[recipe.image_column])
    out: list[dict[str, str]] = [{} for _ in range(n)]
    rows = _Rows(recipe, manifest)
    for name, spec in recipe.attribute_specs.items():
        if spec.pseudonym and pseudo is None:
            continue  # no salt, no pseudonym (see manifest_entries)
        where = (f"{manifest}: column {spec.column!r} (recipe {recipe.source or recipe.name}, "
                 f"attributes.{name})")
        values = coarsen_column(spec, col[spec.column], pseudo, where,
                                lambda i, msg, c=spec.column: rows.error(i, c, msg))
        for i, value in enumerate(values):
            if value is not None:
                out[i][name] = value
        absent = values.count(None)
        if absent:
            log.warning("recipe %s: %s: attribute %s absent for %d of %d rows (blank or not "
                        "usable in column %r)", recipe.name, manifest.name, name, absent, n,
                        spec.column)
    return out


def _whole(rows: _Rows, i: int, column: str, value: Any) -> int | None:
    """An integer cell ('2', 2, 2.0), None for a blank; anything else names the row."""
    if is_blank(value):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        raise rows.error(i, column, f"{_short(value)} is not a number") from None
    if not number.is_integer():
        raise rows.error(i, column, f"{_short(value)} is not a whole number")
    return int(number)


def _label(spec: LabelSpec, rows: _Rows, i: int, col: dict[str, list]) -> tuple[Any, str | None]:
    """(label, None), or (None, "uncertain_label") when the uncertain policy drops the row."""
    if spec.source_column is not None:
        cell = col[spec.source_column][i]
        if is_blank(cell):
            if spec.blank == "error":
                raise rows.error(i, spec.source_column, "blank label (set labels.blank to allow)")
            return [0] * len(spec.names), None
        tokens = {t.strip() for t in str(cell).split(spec.separator) if t.strip()}
        unknown = sorted(tokens - set(spec.names) - set(spec.none_values))
        if unknown:
            raise rows.error(i, spec.source_column,
                             f"label {_short(unknown[0])} is not in labels.names or "
                             "labels.none_values")
        return [int(n in tokens) for n in spec.names], None
    values = []
    for column in spec.columns:
        value = _whole(rows, i, column, col[column][i])
        if value is None:
            if spec.blank == "error":
                raise rows.error(i, column, "blank label (set labels.blank: zero to allow)")
            value = 0 if spec.blank == "zero" else -1
        if value == -1 and spec.type != "multiclass":
            if spec.uncertain == "ignore":
                return None, "uncertain_label"
            value = int(spec.uncertain == "one")
        if spec.type == "multiclass":
            if not 0 <= value < len(spec.names):
                raise rows.error(i, column, f"class {value} is outside 0..{len(spec.names) - 1} "
                                 f"({len(spec.names)} labels.names)")
        elif value not in (0, 1):
            raise rows.error(i, column, f"{spec.type} label must be 0, 1 or -1, got {value}")
        values.append(value)
    return (values if spec.type == "multilabel" else values[0]), None


__all__ = ["SPLITS", "ManifestEntry", "is_blank", "manifest_attributes", "pseudonymizer", "read_entries",
           "read_masks", "resolve"]
