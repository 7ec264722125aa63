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
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medssl.config import build, read_yaml_tree
from medssl.data.attributes import AttributeSpec, parse_header_names, parse_specs
from medssl.data.manifest import (SPLITS, ManifestEntry, is_blank, pseudonymizer, read_entries,
                                  read_masks, resolve)
from medssl.errors import ConfigError, MedsslError

log = logging.getLogger(__name__)



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
        salt: bytes | None = None, folders: bool = False,
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
        here, before any shard is written. ``folders`` (``--volumes``): an image path may be a
        folder (a DICOM series) rather than a file.
        """
        if self.manifest is None:
            raise MedsslError(
                f"{self.source or self.name}: recipe has no manifest (unlabeled); discover the "
                "input files and read patients from their headers instead"
            )
        if not input_dirs:
            raise MedsslError(f"{self.source or self.name}: give at least one INPUT folder")
        pseudo = pseudonymizer(salt) if salt is not None else None
        base = Path(input_dirs[0])
        entries: list[ManifestEntry] = []
        for split, rel in self._manifest_files().items():
            path = resolve(base, rel)
            root = resolve(base, self.root) if self.root is not None else path.parent
            found = read_entries(self, path, root, split, check_files, pseudo, folders)
            if self.masks:
                read_masks(self, path, root, found)
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


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe YAML; errors name the file and the key at fault."""
    path = Path(path)
    tree = read_yaml_tree(path)
    recipe = build(Recipe, tree, where=str(path))
    recipe.source = path
    return recipe


__all__ = ["SPLITS", "LabelSpec", "ManifestEntry", "Recipe", "is_blank", "load_recipe"]
