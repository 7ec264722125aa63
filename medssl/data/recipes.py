"""Dataset recipes: a small YAML that maps a CSV/parquet manifest onto labeled shard inputs.

A recipe says where the manifest is, which column names the image file, how to find the
patient (a column, or a regex on the image path), an optional official split, and how raw
label values become ``int`` (multiclass/binary) or ``list[int]`` of 0/1 (multilabel). The
schema is documented with examples in ``datasets/README.md``; shipped recipes live in
``datasets/recipes/``.

``Recipe.manifest_entries`` reads the manifest and returns one ``ManifestEntry`` per usable row.
Rows that cannot be written come back too, with ``quarantine`` set (``missing_file``,
``uncertain_label``), so the shard report accounts for every row: nothing is dropped silently.
Errors the user must fix (unknown column, a class value that is not an integer) raise
MedsslError naming the recipe or manifest file, the row and the column.

pandas reads both formats; the rest (label policies, split lists, patient regex) is specific
to medical manifests such as CheXpert's and NIH ChestX-ray14's and exists in no library.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medssl.config import build, read_yaml_tree
from medssl.data.attributes import AttributeSpec, parse_header_names, parse_specs
from medssl.errors import ConfigError, MedsslError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class LabelSpec:
    """How raw manifest values become labels (the ``labels:`` section)."""

    type: Literal["multiclass", "binary", "multilabel"] = "multiclass"
    columns: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    # CheXpert's -1 ("uncertain"): U-Zeros, U-Ones, or drop the row (reported, not silent).
    uncertain: Literal["zero", "one", "ignore"] = "zero"
    # A blank cell: CheXpert leaves unmentioned findings blank, which its authors read as 0.
    # Default "error": a blank label cell is a manifest bug unless the dataset says otherwise.
    blank: Literal["zero", "uncertain", "error"] = "error"
    # NIH-style: one column holding names joined by ``separator`` ("Effusion|Mass").
    source_column: str | None = None
    separator: str | None = None
    # Tokens of ``source_column`` meaning "none of the names" ("No Finding").
    none_values: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.source_column is not None:
            if self.type != "multilabel" or not self.separator:
                raise ConfigError(
                    "labels.source_column needs labels.type: multilabel and labels.separator "
                    "(e.g. '|')"
                )
            if self.columns:
                raise ConfigError("labels: give either columns or source_column, not both")
            if not self.names:
                raise ConfigError("labels.names: list the label names found in source_column")
        elif not self.columns:
            raise ConfigError("labels.columns: name the manifest column(s) holding the label")
        if self.type in ("multiclass", "binary") and len(self.columns) != 1:
            raise ConfigError(
                f"labels.columns: {self.type} labels come from exactly one column, "
                f"got {self.columns}; use type: multilabel for several"
            )
        if self.type == "multilabel" and self.source_column is None:
            if not self.names:
                self.names = list(self.columns)
            if len(self.names) != len(self.columns):
                raise ConfigError(
                    f"labels.names: {len(self.names)} names for {len(self.columns)} columns"
                )
        if self.type == "binary":
            self.names = self.names or ["negative", "positive"]
            if len(self.names) != 2:
                raise ConfigError(f"labels.names: binary labels need 2 class names, got {self.names}")
        if self.type == "multiclass" and len(self.names) < 2:
            # index.json carries them: fine-tuning sizes its head from the list.
            raise ConfigError("labels.names: list the class names, in class-value order "
                              "(at least 2), e.g. [none, nodule]")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"labels.names: duplicate names in {self.names}")


@dataclass
class Recipe:
    """One dataset recipe (a ``datasets/recipes/*.yaml`` file). Paths: see ``manifest_entries``."""

    name: str
    manifest: str | dict[str, str] | None = None
    format: Literal["csv", "parquet"] | None = None
    root: str | None = None
    image_column: str | None = None
    patient_column: str | None = None
    patient_pattern: str | None = None
    slice_column: str | None = None
    # Column holding each image's finding-mask file (blank: no finding); read only for
    # ``medssl shard --masks-out`` (medssl.data.masks), never stored in a shard.
    masks: str | None = None
    split_column: str | None = None
    split_values: dict[str, str] | None = None
    split_lists: dict[str, str] | None = None
    labels: LabelSpec | None = None
    # Subgroup attributes from manifest columns: {sex: Sex, age: {column: Age, bins: [...]},
    # view: ..., site: {column: Site, pseudonym: true}} (medssl.data.attributes.parse_specs).
    attributes: dict[str, Any] | None = None
    # Attributes read from DICOM headers, like `medssl shard --attributes`: sex, age, site, scanner.
    header_attributes: list[str] | None = None
    description: str | None = None
    source: Path | None = field(default=None, init=False, repr=False)
    attribute_specs: dict[str, AttributeSpec] = field(default_factory=dict, init=False, repr=False)
    dropped: list[ManifestEntry] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise ConfigError(f"name: use letters, digits, '-', '_' or '.', got {self.name!r}")
        if self.masks is not None and self.manifest is None:
            raise ConfigError("masks: names a manifest column; set manifest: FILE or drop masks")
        self.attribute_specs = parse_specs(self.attributes)
        parse_header_names(self.header_attributes, "header_attributes")
        if self.manifest is None:
            if self.attributes:
                raise ConfigError("attributes: map manifest columns, so they need a manifest; "
                                  "for DICOM headers use header_attributes: [sex, age, site, scanner]")
            if self.labels is not None or self.image_column or self.split_column or self.split_lists:
                raise ConfigError(
                    "manifest: labels, image_column and splits need a manifest; set manifest: "
                    "FILE or drop them (manifest: null means unlabeled, patient from the headers)"
                )
            return
        if isinstance(self.manifest, dict):
            bad = sorted(set(self.manifest) - set(SPLITS))
            if bad or not self.manifest:
                raise ConfigError(
                    f"manifest: as a mapping its keys are splits ({', '.join(SPLITS)}), got {bad}"
                )
            if self.split_column or self.split_lists:
                raise ConfigError("manifest: a per-split manifest mapping already gives the split; "
                                  "drop split_column/split_lists")
        if not self.image_column:
            raise ConfigError("image_column: name the manifest column holding the image path")
        if self.format is None:
            suffixes = {Path(m).suffix.lower() for m in self._manifest_files().values()}
            if suffixes <= {".csv"}:
                self.format = "csv"
            elif suffixes <= {".parquet", ".pq"}:
                self.format = "parquet"
            else:
                raise ConfigError(f"format: cannot tell csv or parquet from {self.manifest!r}; set it")
        if bool(self.patient_column) == bool(self.patient_pattern):
            raise ConfigError(
                "patient_column / patient_pattern: give exactly one (splits are by patient), "
                "e.g. patient_column: patient_id or patient_pattern: 'patient(\\d+)'"
            )
        if self.patient_pattern is not None:
            try:
                groups = re.compile(self.patient_pattern).groups
            except re.error as exc:
                raise ConfigError(f"patient_pattern: not a valid regex ({exc})") from None
            if groups != 1:
                raise ConfigError(
                    f"patient_pattern: needs exactly one (capturing group), e.g. 'patient(\\d+)'; "
                    f"{self.patient_pattern!r} has {groups}"
                )
        if self.split_values is not None:
            if not self.split_column:
                raise ConfigError("split_values: needs split_column")
            bad = sorted(set(self.split_values) - set(SPLITS))
            if bad:
                raise ConfigError(f"split_values: keys must be {', '.join(SPLITS)}, got {bad}")
        if self.split_column and self.split_lists:
            raise ConfigError("split_column and split_lists: give one, not both")
        if self.split_lists is not None:
            bad = sorted(set(self.split_lists) - set(SPLITS))
            if bad:
                raise ConfigError(f"split_lists: keys must be {', '.join(SPLITS)}, got {bad}")

    def _manifest_files(self) -> dict[str | None, str]:
        if isinstance(self.manifest, dict):
            return dict(self.manifest)
        return {None: self.manifest} if self.manifest else {}

    def labels_info(self) -> dict[str, Any] | None:
        """``index.json``'s ``labels``: ``{"type": ..., "names": [...]}``, or None if unlabeled."""
        if self.labels is None:
            return None
        return {"type": self.labels.type, "names": list(self.labels.names)}

    def attributes_info(self) -> dict[str, dict[str, Any]]:
        """index.json config's view of ``attributes:``: name -> column and coarsening."""
        return {name: spec.describe() for name, spec in sorted(self.attribute_specs.items())}

    def manifest_entries(
        self, input_dirs: list[Path], check_files: bool = True, include_dropped: bool = False,
        salt: bytes | None = None,
    ) -> list[ManifestEntry]:
        """Read the manifest(s) and return one entry per row, in manifest order.

        Relative ``manifest`` paths are resolved against ``input_dirs[0]``. Image paths are
        resolved against ``root`` (itself relative to ``input_dirs[0]``) when given, else the
        folder of the manifest they come from. A row whose image does not exist is returned
        with ``quarantine="missing_file"`` (with ``check_files``); its path does not exist,
        so a reader quarantines it too. Rows the label policy drops (``uncertain: ignore``)
        are left out of the list, counted in the log and kept in ``self.dropped``, unless
        ``include_dropped`` (then they come back with ``quarantine="uncertain_label"``).
        ``salt`` (the corpus salt, which ``medssl shard`` always passes) makes the pseudonyms of
        ``pseudonym: true`` attributes; without it those attributes are left out (a pseudonym
        needs the salt, and the raw value must never stand in for it).
        A column of ``attributes:`` with more than ``MAX_DISTINCT`` distinct values is refused
        here, before any shard is written.
        """
        if self.manifest is None:
            raise MedsslError(
                f"{self.source or self.name}: recipe has no manifest (unlabeled); discover the "
                "input files and read patients from their headers instead"
            )
        if not input_dirs:
            raise MedsslError(f"{self.source or self.name}: give at least one INPUT folder")
        pseudo = _pseudonymizer(salt) if salt is not None else None
        base = Path(input_dirs[0])
        entries: list[ManifestEntry] = []
        for split, rel in self._manifest_files().items():
            path = _resolve(base, rel)
            root = _resolve(base, self.root) if self.root is not None else path.parent
            found = _read_entries(self, path, root, split, check_files, pseudo)
            if self.masks:
                _read_masks(self, path, root, found)
            entries += found
        # Two rows for one image (or one slice) would write it twice, perhaps with two labels.
        seen: dict[tuple[Path, int | None], ManifestEntry] = {}
        for e in entries:
            first = seen.setdefault((e.path, e.slice), e)
            if first is not e:
                where = "" if e.slice is None else f" slice {e.slice}"
                raise MedsslError(
                    f"{e.manifest}: row {e.row} repeats the image{where} of row {first.row} "
                    f"in {first.manifest.name}; keep one row per image"
                )
        reasons = Counter(e.quarantine for e in entries if e.quarantine)
        if reasons:
            log.warning("recipe %s: %d of %d manifest rows cannot be written: %s", self.name,
                        sum(reasons.values()), len(entries), dict(sorted(reasons.items())))
        self.dropped = [e for e in entries if e.quarantine == "uncertain_label"]
        if include_dropped:
            return entries
        return [e for e in entries if e.quarantine != "uncertain_label"]


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


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe YAML; errors name the file and the key at fault."""
    path = Path(path)
    tree = read_yaml_tree(path)
    recipe = build(Recipe, tree, where=str(path))
    recipe.source = path
    return recipe


def _resolve(base: Path, rel: str | Path) -> Path:
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
        path = _resolve(folder, rel)
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


def _read_entries(recipe: Recipe, manifest: Path, root: Path, split: str | None,
                  check_files: bool, pseudo=None) -> list[ManifestEntry]:
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
        path = _resolve(root, raw)
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
        if reason is None and check_files and not path.is_file():
            reason = "missing_file"
        entries.append(ManifestEntry(path=path, patient_id=patient, label=label, split=row_split,
                                     row=i, slice=slice_index, manifest=manifest,
                                     quarantine=reason, attributes=attrs[i]))
    return entries


def _read_masks(recipe: Recipe, manifest: Path, root: Path, entries: list[ManifestEntry]) -> None:
    """Set ``entry.mask`` from the ``masks`` column (resolved like image paths; blank: None).

    Apart from ``_read_entries`` because masks are wanted by one command only; whether a mask
    can be read is the worker's question (``bad_mask``), asked only when masks are written.
    """
    table = _read_table(recipe, manifest)
    if recipe.masks not in table.columns:
        raise MedsslError(
            f"{manifest}: no column {recipe.masks!r} (recipe {recipe.source or recipe.name}, key "
            f"masks); columns are {', '.join(map(str, table.columns[:30]))}"
        )
    for entry, value in zip(entries, table[recipe.masks].tolist()):
        entry.mask = None if is_blank(value) else _resolve(root, str(value).strip())
def _pseudonymizer(salt: bytes):
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


__all__ = ["SPLITS", "LabelSpec", "ManifestEntry", "Recipe", "is_blank", "load_recipe"]
