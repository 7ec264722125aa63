"""Typed config of the explanations (``evaluation.explain`` in a finetune config; ``medssl explain``).

```yaml
evaluation:
  explain: {n_per_class: 4, protocol: linear, method: gradcam}
```

A light module (no torch): the config tree and ``--help`` import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from medssl.errors import ConfigError


@dataclass
class ExplainConfig:
    """Class-activation maps with sanity checks for one model per (task, init)."""

    n_per_class: int = 4          # test images per class in each grid
    #: The explained model: the linear probe on frozen features, or the fine-tuned network.
    protocol: Literal["linear", "finetune"] = "linear"
    #: gradcam (CNNs and ViTs) or rollout (attention rollout, ViTs only).
    method: Literal["gradcam", "rollout"] = "gradcam"
    #: The class each map explains: the predicted one, or the true one.
    targets: Literal["pred", "true"] = "pred"
    #: Label fraction of the explained cell; null = the largest in label_fractions.
    fraction: float | None = None
    seed: int | None = None       # seed of the explained cell; null = the first in seeds
    #: Data-randomisation test (a model fitted on permuted labels): null = where cheap (the
    #: linear probe: one refit), true = also for fine-tuning (one more training run), false = never.
    data_randomisation: bool | None = None
    #: Where the findings are, for the localisation score: a .npz of bool masks named by
    #: shard sample key, or a CSV with key,x0,y0,x1,y1 boxes (finetune/explain_masks.py).
    masks: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.n_per_class <= 64:
            raise ConfigError(f"evaluation.explain.n_per_class must be between 1 and 64, got "
                              f"{self.n_per_class}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"evaluation.explain.fraction must be in (0, 1], got {self.fraction}")
        self.masks = os.path.expanduser(self.masks) if self.masks else None
