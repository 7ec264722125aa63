"""Typed config of the clinical evaluation (``evaluation:`` in a finetune config).

```yaml
evaluation:
  subgroups: [sex, age, site, view]   # per-subgroup AUC/ACC/sensitivity/specificity, gaps
  min_subgroup_count: 20              # test units (patients where known) a group needs
  min_subgroup_per_class: 5           # units with and without each scored class
  calibration_bins: 15
  shift: {attribute: site, holdout: [SITE_A]}   # or {attribute: site, leave_one_out: true}
  # shift.protocols: the run's knn and linear by default; shift.fractions: all of the run's
```

Calibration (ECE before/after temperature scaling) needs no switch: every cell with
probabilistic outputs reports it. Every value is checked in ``__post_init__`` with a message that
says what to change.

Cost of the shift: each fold retrains every (init, seed, protocol, fraction) it covers on the
other sites, so F folds multiply those cells by F. kNN and the linear probe reuse the cached
frozen features (a fold only re-selects rows), so they cost seconds; full fine-tuning would
retrain a network per fold, and is therefore run only when ``shift.protocols`` names it.
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

    attribute: str = "site"       # the attribute whose values are held out (sex, age, site, view)
    #: Values held out, one fold each (a single name is a list of one).
    holdout: list[str] = field(default_factory=list)
    leave_one_out: bool = False   # instead of holdout: every value found in the test split in turn
    #: Protocols the folds run; null = the run's knn and linear (cheap on cached features):
    #: finetune retrains a whole network per fold, so it runs only when listed here.
    protocols: list[str] | None = None
    #: Label fractions the folds run at (of the other sites' train images); null = all of the run's.
    fractions: list[float] | None = None

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
        if self.protocols is not None and (not self.protocols or len(set(self.protocols)) != len(self.protocols)):
            raise ConfigError(f"evaluation.shift.protocols must be distinct protocol names, got {self.protocols}")
        if self.fractions is not None and (not self.fractions or any(not 0 < f <= 1 for f in self.fractions)):
            raise ConfigError(f"evaluation.shift.fractions must be label fractions in (0, 1] or null, "
                              f"got {self.fractions}")


@dataclass
class EvaluationConfig:
    #: Attributes scored per subgroup (sex, age, site, view); [] = none (shard tasks only).
    subgroups: list[str] = field(default_factory=list)
    #: A subgroup with fewer test units (patients where known, else images) is "not estimable".
    min_subgroup_count: int = 20
    #: A subgroup with fewer units with, or without, any scored class is "not estimable" too.
    min_subgroup_per_class: int = 5
    calibration_bins: int = 15   # bins of the expected calibration error (equal-width and equal-mass)
    #: Multi-label temperature scaling: one temperature per label (True) or one for all.
    per_label_temperature: bool = True
    #: Site shift: {attribute: site, holdout: [NAME]} or {attribute: site, leave_one_out: true},
    #: optional protocols (default: the run's knn, linear) and fractions (default: all); null = no shift.
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

    def check_run(self, protocols: list[str], fractions: list[float]) -> None:
        """Cross-checks against the run's grid: the shift runs a subset of its cells."""
        if self.shift is None:
            return
        extra = [p for p in self.shift.protocols or [] if p not in protocols]
        if extra:
            raise ConfigError(f"evaluation.shift.protocols {extra} are not in protocols {protocols}; "
                              f"the shift reruns protocols of the grid only")
        if not self.shift_protocols(protocols):
            raise ConfigError(f"evaluation.shift runs no protocol: by default it reruns knn and linear, "
                              f"and protocols is {protocols}; list them in evaluation.shift.protocols")
        if self.shift.fractions is not None:
            extra_f = [f for f in self.shift.fractions if f not in fractions]
            if extra_f:
                raise ConfigError(f"evaluation.shift.fractions {extra_f} are not in label_fractions {fractions}")

    def shift_protocols(self, protocols: list[str]) -> list[str]:
        """The run's protocols the shift folds cover, in run order ([] without a shift)."""
        if self.shift is None:
            return []
        chosen = self.shift.protocols if self.shift.protocols is not None else ["knn", "linear"]
        return [p for p in protocols if p in chosen]

    def shift_fractions(self, fractions: list[float]) -> list[float]:
        """The run's label fractions the shift folds cover, in run order."""
        if self.shift is None:
            return []
        return list(fractions) if self.shift.fractions is None else [f for f in fractions if f in self.shift.fractions]
