"""Typed config of ``medssl finetune``: which tasks, initialisations, protocols, fractions, seeds.

Every value is checked in ``__post_init__`` before any work starts, with a message that says
what to change. ``configs/finetune/*.yaml`` only override these defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from finetune.config3d import MEDMNIST_3D, MEDMNIST_3D_SIZES, check_volume_config
from finetune.evaluation_config import EvaluationConfig
from medssl.errors import ConfigError
from medssl.init import Init

PROTOCOLS = ("knn", "linear", "finetune")
#: The twelve 2-D MedMNIST datasets (medmnist.INFO holds their task types and split sizes).
MEDMNIST_2D = (
    "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
    "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
)


@dataclass
class ModelConfig:
    #: timm architecture every init is built as, or monai:<Net> for 3-D (finetune/config3d.py)
    arch: str = "resnet18"
    #: Channels fed to the network; None = the task's own (1 for grayscale, 3 for RGB).
    #: An ssl init always uses its published in_chans (images are converted to match).
    in_chans: int | None = None
    #: 3-D only: monai.networks.nets.<Net> kwargs of random and monai-ssl inits; None = the first
    #: ssl init's (its config.json), so every init is the same network, else MONAI's defaults.
    kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.arch:
            raise ConfigError("model.arch must name a timm architecture, e.g. resnet18")
        if self.in_chans is not None and self.in_chans not in (1, 3):
            raise ConfigError(f"model.in_chans must be 1, 3 or null (auto), got {self.in_chans}")


@dataclass
class TaskConfig:
    """One downstream task: a MedMNIST flag read from local npz files, or labeled shards."""

    name: str = ""                # names the task in reports and file names
    kind: Literal["medmnist", "shards"] = "medmnist"   # MedMNIST npz files, or labeled shards
    flag: str | None = None       # medmnist: e.g. breastmnist
    root: str | None = None       # medmnist: folder holding {flag}.npz / {flag}_{size}.npz
    size: int = 28                # medmnist: 28 | 64 | 128 | 224 (the npz file's native size; 3-D: 28 | 64)
    path: str | None = None       # shards: folder with index.json

    def __post_init__(self) -> None:
        self.root = os.path.expanduser(self.root) if self.root else self.root
        self.path = os.path.expanduser(self.path) if self.path else self.path
        if self.kind == "medmnist":
            if self.flag is None:
                self.flag = self.name or None
            if self.flag not in MEDMNIST_2D + MEDMNIST_3D:
                raise ConfigError(
                    f"tasks: {self.name!r}: flag must be one of the MedMNIST datasets "
                    f"({', '.join(MEDMNIST_2D + MEDMNIST_3D)}), got {self.flag!r}"
                )
            if self.flag in MEDMNIST_3D and self.size not in MEDMNIST_3D_SIZES:
                raise ConfigError(f"tasks: {self.name!r}: a 3-D MedMNIST size must be 28 or 64")
            if self.size not in (28, 64, 128, 224):
                raise ConfigError(f"tasks: {self.name!r}: size must be 28, 64, 128 or 224")
            if not self.root:
                raise ConfigError(
                    f"tasks: {self.name!r}: set root to the folder holding {self.flag}.npz"
                )
            self.name = self.name or self.flag
        else:
            if not self.path:
                raise ConfigError(f"tasks: {self.name!r}: a shards task needs path: DIR (with index.json)")
            if not self.name:
                raise ConfigError("tasks: a shards task needs a name")
        if "/" in self.name or not self.name.strip():
            raise ConfigError(f"tasks: name {self.name!r} must be a plain word (it names files)")


@dataclass
class KnnConfig:
    #: Candidate k values; the one with the best validation AUC is used on test.
    k: list[int] = field(default_factory=lambda: [20])
    #: Softmax temperature of the similarity-weighted vote (0.1 as in the InstDisc/DINO monitor).
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if not self.k or any(k < 1 for k in self.k):
            raise ConfigError(f"knn.k must be positive integers, got {self.k}")
        if self.temperature <= 0:
            raise ConfigError("knn.temperature must be > 0")


@dataclass
class LinearConfig:
    #: Inverse L2 strengths tried; the best validation AUC wins.
    Cs: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])
    max_iter: int = 1000          # lbfgs iterations per fit

    def __post_init__(self) -> None:
        if not self.Cs or any(c <= 0 for c in self.Cs):
            raise ConfigError(f"linear.Cs must be positive numbers, got {self.Cs}")
        if self.max_iter < 1:
            raise ConfigError("linear.max_iter must be >= 1")


@dataclass
class FinetuneConfig:
    epochs: int = 20              # at most; early stopping may end sooner
    batch_size: int = 64          # images per optimizer step
    lr: float = 1e-3              # AdamW peak learning rate, cosine schedule
    weight_decay: float = 1e-4    # AdamW weight decay
    #: Epochs without a better validation AUC before stopping.
    patience: int = 5
    #: Random horizontal flips during training (off by default: MedMNIST baselines use none,
    #: and laterality can be a label).
    hflip: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ConfigError("finetune.epochs, batch_size and patience must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("finetune.lr must be > 0 and weight_decay >= 0")


@dataclass
class BootstrapConfig:
    #: Replicates; each resamples the test patients (images where a task has no patient ids)
    #: and the effective seeds (see finetune/stats.py).
    n: int = 1000
    confidence: float = 0.95      # coverage of every interval in the report

    def __post_init__(self) -> None:
        if self.n < 10:
            raise ConfigError("bootstrap.n must be >= 10 (1000 is usual)")
        if not 0.5 < self.confidence < 1:
            raise ConfigError("bootstrap.confidence must be between 0.5 and 1, e.g. 0.95")


@dataclass
class LoggingConfig:
    wandb: Literal["online", "offline", "disabled"] = "disabled"   # Weights & Biases logging mode
    wandb_project: str = "medssl-finetune"   # Weights & Biases project name


@dataclass
class FinetuneRunConfig:
    output_dir: str = "runs/finetune"   # results.json, report.md, plots; a re-run resumes here
    seed: int = 0                 # bootstrap draws and the ImageNet/SSL feature pass
    model: ModelConfig = field(default_factory=ModelConfig)
    #: ``ssl:DIR`` (a published dir), ``imagenet``, ``random``.
    inits: list[str] = field(default_factory=lambda: ["imagenet", "random"])
    #: Local ImageNet weights (safetensors or a timm-layout file) used when the hub is unreachable.
    imagenet_weights: str | None = None
    tasks: list[TaskConfig] = field(default_factory=list)   # [{name, kind, flag/root/size or path}]
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))  # knn, linear, finetune
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # of the train split
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])   # label subset, training, random weights
    #: Side in px the network sees; images are resized to it.
    input_size: int = 224
    #: nearest reproduces MedMNIST's "28 upsampled to 224"; bilinear is smoother.
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    #: Batch size of frozen-feature extraction.
    feature_batch_size: int = 128
    device: str = "auto"          # auto (cuda when available), cpu, cuda[:N] or mps
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    #: Calibration (always), subgroups and site shift of every cell (finetune/evaluation_config.py).
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    @property
    def init_list(self) -> list[Init]:
        """``inits`` parsed, in config order."""
        return [Init.parse(i) for i in self.inits]

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks is empty; name at least one task (see configs/finetune/medmnist.yaml)")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: names must be unique, got {names}")
        if not self.inits:
            raise ConfigError("inits is empty; use e.g. [ssl:published/, imagenet, random]")
        try:
            parsed = [Init.parse(i) for i in self.inits]
        except ConfigError as exc:
            raise ConfigError(f"inits: {exc}") from None
        if len(set(parsed)) != len(parsed):
            raise ConfigError(f"inits: duplicates in {self.inits}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ConfigError(f"protocols must be a non-empty subset of {list(PROTOCOLS)}, got {self.protocols}")
        if not self.label_fractions or any(not 0 < f <= 1 for f in self.label_fractions):
            raise ConfigError(f"label_fractions must be in (0, 1], got {self.label_fractions}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        if self.input_size < 8:
            raise ConfigError(f"input_size must be >= 8 px, got {self.input_size}")
        if self.feature_batch_size < 1:
            raise ConfigError("feature_batch_size must be >= 1")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise ConfigError(f"device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        self.evaluation.check_run(self.protocols, self.label_fractions)
        check_volume_config(self)
