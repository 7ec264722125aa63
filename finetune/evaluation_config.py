"""Typed config of the clinical evaluation (``evaluation:`` in a finetune config).

```yaml
evaluation:
  subgroups: [sex, age, site, view]   # per-subgroup AUC/ACC/sensitivity/specificity, gaps
  min_subgroup_count: 20              # test units (patients where known) a group needs
  min_subgroup_per_class: 5           # units with and without each scored class
  calibration_bins: 15
  shift: {attribute: site, holdout: [SITE_A]}   # or {attribute: site, leave_one_out: true}
```

Calibration (ECE before/after temperature scaling) needs no switch: every cell with
probabilistic outputs reports it. Every value is checked in ``__post_init__`` with a message that
says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medssl.errors import ConfigError

#: Attributes a subgroup or shift analysis can use: the ones de-identified shards may record
#: (age only as a band, never an exact age).
ATTRIBUTES = ("sex", "age", "site", "view")


@dataclass
class ShiftConfig:
    """Site shift as a protocol: hold out the ``holdout`` values of ``attribute`` (or each value
    in turn with ``leave_one_out``), train and select on the rest (finetune/shift.py)."""

    attribute: str = "site"
    holdout: list[str] = field(default_factory=list)
    leave_one_out: bool = False

    def __post_init__(self) -> None:
        if self.attribute not in ATTRIBUTES:
            raise ConfigError(f"evaluation.shift.attribute must be one of {', '.join(ATTRIBUTES)}, "
                              f"got {self.attribute!r}")
        self.holdout = [str(h) for h in self.holdout]
        if self.leave_one_out and self.holdout:
            raise ConfigError("evaluation.shift: holdout and leave_one_out are exclusive; list the "
                              "held-out values in holdout, or set leave_one_out: true and drop holdout")
        if not self.leave_one_out and not self.holdout:
            raise ConfigError(f"evaluation.shift: name the held-out {self.attribute} values "
                              f"(holdout: [NAME]) or set leave_one_out: true")
        if any(not h.strip() for h in self.holdout) or len(set(self.holdout)) != len(self.holdout):
            raise ConfigError(f"evaluation.shift.holdout must be distinct non-empty names, got {self.holdout}")


@dataclass
class EvaluationConfig:
    subgroups: list[str] = field(default_factory=list)
    #: A subgroup with fewer test units (patients where known, else images) is "not estimable".
    min_subgroup_count: int = 20
    #: ... and so is one with fewer units with, or without, any scored class.
    min_subgroup_per_class: int = 5
    calibration_bins: int = 15
    #: Multi-label temperature scaling: one temperature per label (True) or one for all.
    per_label_temperature: bool = True
    shift: ShiftConfig | None = None

    def __post_init__(self) -> None:
        bad = [a for a in self.subgroups if a not in ATTRIBUTES]
        if bad:
            raise ConfigError(f"evaluation.subgroups: {bad} unknown; choose from {', '.join(ATTRIBUTES)}")
        if len(set(self.subgroups)) != len(self.subgroups):
            raise ConfigError(f"evaluation.subgroups: duplicates in {self.subgroups}")
        if self.min_subgroup_count < 2:
            raise ConfigError(f"evaluation.min_subgroup_count must be >= 2 (20 is usual), got "
                              f"{self.min_subgroup_count}")
        if self.min_subgroup_per_class < 1:
            raise ConfigError(f"evaluation.min_subgroup_per_class must be >= 1 (5 is usual), got "
                              f"{self.min_subgroup_per_class}")
        if self.min_subgroup_per_class * 2 > self.min_subgroup_count:
            raise ConfigError("evaluation.min_subgroup_count must be at least twice "
                              "min_subgroup_per_class (a group needs units with and without each class)")
        if not 2 <= self.calibration_bins <= 100:
            raise ConfigError(f"evaluation.calibration_bins must be between 2 and 100 (15 is usual), "
                              f"got {self.calibration_bins}")
