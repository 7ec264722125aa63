"""The results record of ``medssl finetune``: ``results.json``, and the cells it is built from.

Written by finetune (one ``CellRow`` per finished or skipped cell, one ``Aggregate`` per
task x init x protocol x label fraction), read by ``medssl publish --results`` for the model
card and by anyone comparing benchmarks. The JSON layout is the one ``docs/internals.md``
documents (flat ``auc_mean``/``auc_ci`` keys); this module is the only place that knows it.
Unknown keys in a file are ignored, so a card can still be built from a newer results file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

FORMAT = "medssl-finetune-results/1"


@dataclass
class CellRow:
    """One (task, init, protocol, label fraction, seed) cell: its test metrics or why skipped."""

    task: str
    init: str                  # as in the config: ssl:DIR | imagenet | random
    init_label: str            # short display name
    protocol: str              # knn | linear | finetune
    fraction: float            # label fraction of the train split
    seed: int
    n_train: int               # labelled train images the cell used
    status: str                # ok | skipped
    key: str                   # content hash of what defines the cell (finetune/cells.py)
    reason: str = ""           # why skipped
    auc: float | None = None   # test AUC (medmnist's definition); None when not computed
    acc: float | None = None
    val_auc: float | None = None
    chosen: dict[str, Any] = field(default_factory=dict)  # hyper-parameters chosen on val
    seconds: float | None = None
    #: A site-shift cell: ``"{attribute}={held-out value}"`` (e.g. ``site=H2``), trained and
    #: selected without that value's images; its auc/acc are on the held-out test images.
    #: None: an in-distribution cell (older files have none).
    fold: str | None = None
    #: Why this row is not a held-out estimate (finetune/leakage_guard.py): set when the leakage
    #: guard found the task's test or val data in the init's pretraining and
    #: ``evaluation.allow_leakage`` let the benchmark go on; empty when it found none.
    leakage: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.auc is not None and math.isfinite(self.auc)


@dataclass
class Difference:
    """``reference - init`` of one aggregate, paired on test draws and seeds."""

    reference: str
    auc: float | None
    auc_ci: list[float | None]
    acc: float | None
    acc_ci: list[float | None]
    n_seeds: int
    n_effective_seeds: int | None = None


@dataclass
class Calibration:
    """``Aggregate.calibration``: ECE before/after temperature scaling (docs/results_schema.md).

    Intervals are ``{"mean", "ci"}`` dicts; ``ece[binning][stage]`` with binning ``width`` |
    ``mass`` and stage ``before`` | ``after`` also holds ``floor`` and ``verdict``."""

    kind: str                        # top-label | per-label (multi-label)
    n_bins: int
    ece: dict[str, dict[str, dict[str, Any]]]
    temperature: dict[str, Any]      # fitted_on, scope, per_seed: {seed: {values, fitted}}
    reliability: dict[str, Any]      # stage -> binning -> per-bin lists (effective seeds pooled)
    n_seeds: int
    n_effective_seeds: int
    resampling: str
    n_units: int
    per_label: dict[str, Any] | None = None     # multi-label only: binning -> stage -> [L]
    diff_vs_ssl: dict[str, Any] | None = None   # non-reference inits: reference ECE - this

    def ece_of(self, binning: str = "width", stage: str = "after") -> tuple[float | None, list[float | None]]:
        """``(mean, [lo, hi])`` of one ECE (e.g. equal-width bins after temperature scaling)."""
        e = self.ece[binning][stage]
        return e["mean"], list(e["ci"])


@dataclass
class Subgroups:
    """``Aggregate.subgroups``: per-subgroup metrics, worst group and largest gap per attribute
    (docs/results_schema.md). A group that is not estimable has a ``reason``, never a number."""

    threshold: dict[str, Any]        # per_seed: {seed: {rule, values, chosen}} (chosen on val)
    min_count: int
    min_per_class: int
    resampling: str
    n_units: int
    n_seeds: int
    n_effective_seeds: int | None
    attributes: dict[str, dict[str, Any]]   # name -> {n_missing, groups, worst, gap, gap_vs_ssl?}


@dataclass
class Shift:
    """``Aggregate.shift``: the drop in AUC when a site is held out, per fold
    (docs/results_schema.md)."""

    attribute: str | None
    folds: dict[str, dict[str, Any]]    # held-out value -> {auc_in, auc_out, drop, drop_vs, verdict, ...}
    verdict: str                        # over all folds, the same words in every init's entry


@dataclass
class Aggregate:
    """One task x init x protocol x fraction over its seeds, with bootstrap intervals."""

    task: str
    init: str
    init_label: str
    protocol: str
    fraction: float
    auc_mean: float | None
    auc_ci: list[float | None] = field(default_factory=lambda: [None, None])
    acc_mean: float | None = None
    acc_ci: list[float | None] = field(default_factory=lambda: [None, None])
    n_seeds: int = 0
    n_effective_seeds: int | None = None   # distinct seed results (None in older files)
    resampling: str = "images"             # the bootstrap unit: patients | images
    n_units: int | None = None             # test units resampled
    diff_vs_ssl: Difference | None = None
    calibration: Calibration | None = None   # None in older files, or with no validation scores
    subgroups: Subgroups | None = None       # with evaluation.subgroups
    shift: Shift | None = None               # with evaluation.shift, for the protocols it covers

    @property
    def effective_seeds(self) -> int:
        return self.n_effective_seeds if self.n_effective_seeds is not None else self.n_seeds


@dataclass
class Results:
    """The whole ``results.json``."""

    git_sha: str
    config: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    rows: list[CellRow]
    aggregates: list[Aggregate]
    format: str = FORMAT

    def write(self, path: Path) -> None:
        """Atomically, as strict JSON (NaN becomes null)."""
        from medssl.io import atomic_write_json

        atomic_write_json(Path(path), json_safe(_adapter(Results).dump_python(self)))

    @classmethod
    def read(cls, path: Path) -> Results:
        """Parse and type-check a results.json; MedsslError naming the file otherwise."""
        from pydantic import ValidationError

        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MedsslError(f"{path}: results file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MedsslError(f"{path}: not a readable results.json ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise MedsslError(f"{path}: format is {found!r}, expected {FORMAT!r} (a `medssl finetune` "
                              "results.json)")
        try:
            return _adapter(Results).validate_python(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise MedsslError(f"{path}: {where}: {first['msg']}") from None


def json_safe(value: Any) -> Any:
    """Replace NaN/inf by None and numpy scalars by Python ones, recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()   # numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@cache
def _adapter(cls: type):
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def row_from_json(data: dict[str, Any]) -> CellRow:
    """A ``CellRow`` from one line of ``cells.jsonl`` (or a results.json row)."""
    return _adapter(CellRow).validate_python(data)


def row_to_json(row: CellRow) -> dict[str, Any]:
    return json_safe(_adapter(CellRow).dump_python(row))
