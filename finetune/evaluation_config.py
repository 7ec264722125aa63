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

import os
from dataclasses import dataclass, field

from finetune.explain_config import ExplainConfig
from medssl.errors import ConfigError

#: Attributes a subgroup or shift analysis can use: the ones de-identified shards may record
#: (age only as a band, never an exact age).
ATTRIBUTES = ("sex", "age", "site", "view")


@dataclass
class ShiftConfig:
    """Site shift as a protocol: hold out the ``holdout`` values of ``attribute`` (or each value
    in turn with ``leave_one_out``), train and select on the rest (finetune/shift.py)."""

    attribute: str = "site"       # the attribute whose values define the sites
    holdout: list[str] = field(default_factory=list)   # values held out for testing
    leave_one_out: bool = False   # hold out each value in turn instead of a fixed holdout

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
    #: Per-subgroup metrics for these attributes (sex, age, site, view).
    subgroups: list[str] = field(default_factory=list)
    #: A subgroup with fewer test units (patients where known, else images) is "not estimable".
    min_subgroup_count: int = 20
    #: ... and so is one with fewer units with, or without, any scored class.
    min_subgroup_per_class: int = 5
    calibration_bins: int = 15    # bins of the expected calibration error
    #: Multi-label temperature scaling: one temperature per label (True) or one for all.
    per_label_temperature: bool = True
    #: Site shift as a protocol: {attribute, holdout: [...]} or {attribute, leave_one_out: true}.
    shift: ShiftConfig | None = None
    #: Class-activation maps with sanity checks per task and init, linked from report.md:
    #: {n_per_class, protocol: linear|finetune, method: gradcam|rollout, targets, masks, ...}.
    explain: ExplainConfig | None = None
    #: Go on when an ssl init's pretraining read the task's test or val split, or saw its test
    #: or val patients; every row and the card then say so (finetune/leakage_guard.py).
    allow_leakage: bool = False
    #: Also look for near-duplicate images between each ssl init's pretraining shards and the
    #: task's test and val splits (`medssl leakage`), recorded per task in results.json.
    leakage_check: bool = False
    #: Pretraining shard folders for the image check (and the patient check of weights that
    #: carry no patient hashes); matched to ssl inits by index.json digest. A task folder that
    #: pretraining read needs no entry.
    pretraining_shards: list[str] = field(default_factory=list)
    #: Hamming radius (of 256 bits) of the image check; null = the measured default (42).
    leakage_radius: int | None = None

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
        self.pretraining_shards = [os.path.expanduser(p) for p in self.pretraining_shards]
        if self.leakage_radius is not None and not 0 <= self.leakage_radius < 256:
            raise ConfigError(f"evaluation.leakage_radius must lie in [0, 256), got {self.leakage_radius}")
        if not 2 <= self.calibration_bins <= 100:
            raise ConfigError(f"evaluation.calibration_bins must be between 2 and 100 (15 is usual), "
                              f"got {self.calibration_bins}")
