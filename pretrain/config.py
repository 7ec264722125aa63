"""Typed config tree of ``medssl pretrain``: defaults here, YAML overrides, ``key=value`` last.

Load with ``medssl.config.load_config(PretrainConfig, path, overrides)``. Values that depend on
the method (augmentation, optimizer, learning rate, weight decay) default to ``None`` and are
filled in from the method registry by ``pretrain.resolve.resolve_config``, so the saved
``config.yaml`` always shows the numbers that actually ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from medssl.errors import ConfigError
from medssl.init import Init
from medssl.volume_models import is_volume_arch


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class DataConfig:
    shards: str = ""               # folder (its index.json's split), glob or brace pattern
    split: str = "train"           # split used when ``shards`` is a folder with index.json
    num_workers: int = 4           # CPU loader processes per rank: read, decode, crop only
    load_size: int = 256           # CPU workers emit [C, load_size, load_size] integer tensors
    # Volume shards (model.arch monai:<Net>): CPU workers emit a cube [C, L, L, L], L = volume_size,
    # deterministically: crop = the centred cube of the shortest side, pad = the volume centred in
    # a cube of its longest side (filled with its lowest stored value: air/background); either
    # cube is then resized to L (area averaging down, trilinear up). crop keeps every voxel real
    # data but can cut anatomy; pad keeps all of it at a coarser scale. Voxels stay as sharded
    # (RAS, --spacing), so the cube is isotropic when the spacing is.
    volume_size: int = 112
    volume_fit: Literal["crop", "pad"] = "crop"   # volumes: cube of the shortest side, or padded to the longest
    shuffle_buffer: int = 1000     # samples held per worker for shuffling
    shuffle_initial: int = 100     # samples buffered before the first is emitted
    prefetch_factor: int = 4       # batches prefetched per worker
    pin_memory: bool = True        # only used when training on a GPU
    max_bad_samples: int = 100     # undecodable samples tolerated per worker before failing
    # Shard check before step 1 (pretrain/shardcheck.py): quick = exists, size, tar-header
    # sample count against index.json; full = also sha256 (cached per run dir by size+mtime).
    verify: Literal["quick", "full"] = "quick"
    # Positive pairs (pretrain/pairs.py): two views of one image, or of two images of one
    # patient (MICLe) / of one patient's study (MedAug), where the patient has several.
    positives: Literal["same_image", "same_patient", "same_study"] = "same_image"
    pair_buffer: int = 1000        # patients waiting for a second image, per worker

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "data.num_workers must be >= 0 (0 reads in the main process)")
        _check(self.load_size >= 8, f"data.load_size must be >= 8 px, got {self.load_size}")
        _check(self.volume_size >= 8, f"data.volume_size must be >= 8 voxels, got {self.volume_size}")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1 (1 disables shuffling)")
        _check(self.shuffle_initial >= 1, "data.shuffle_initial must be >= 1")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor must be >= 1")
        _check(self.max_bad_samples >= 0, "data.max_bad_samples must be >= 0")
        _check(self.pair_buffer >= 1, "data.pair_buffer must be >= 1")


@dataclass
class ModelConfig:
    arch: str = "resnet50"                 # any timm model name (2-D), or monai:<Net> for volumes (3-D)
    in_chans: int = 1                      # 1 for grayscale scans (native, no channel copies), 3 for RGB
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model / monai.networks.nets.<Net> kwargs
    # Where the backbone starts (pretrain/init.py): random | imagenet (continued pretraining
    # from ImageNet weights) | ssl:DIR (a `medssl publish` dir). A resumed run ignores it.
    init: str = "random"
    imagenet_weights: str | None = None    # a local ImageNet weights file; else the Hub cache or a package

    def __post_init__(self) -> None:
        _check(self.in_chans in (1, 3), f"model.in_chans must be 1 (grayscale) or 3 (RGB), got {self.in_chans}")
        _check(bool(self.arch), "model.arch must name a timm model, e.g. resnet50")
        try:
            Init.parse(self.init)
        except ConfigError as exc:
            raise ConfigError(f"model.{exc}") from None


@dataclass
class MethodConfig:
    name: str = "simclr"                   # simclr | mae | dino (see pretrain/methods)
    # SimCLR
    temperature: float = 0.1            # SimCLR: NT-Xent softmax temperature
    proj_hidden_dim: int = 2048          # SimCLR: projection head hidden width
    proj_output_dim: int = 128           # SimCLR: projection output width (loss space)
    # MAE
    mask_ratio: float = 0.75             # MAE: fraction of patches hidden from the encoder
    decoder_dim: int = 512               # MAE: decoder width
    decoder_depth: int = 8               # MAE: decoder blocks
    decoder_heads: int = 16              # MAE: decoder attention heads
    norm_pix_loss: bool = True           # MAE: regress per-patch normalised pixels
    # DINO
    head_hidden_dim: int = 2048          # DINO: head MLP width
    head_bottleneck_dim: int = 256       # DINO: head bottleneck (L2-normalised) width
    head_output_dim: int = 65536         # DINO: prototypes (softmax width)
    teacher_temp: float = 0.04           # DINO: teacher softmax temperature after warm-up
    warmup_teacher_temp: float = 0.04    # DINO: teacher temperature at step 0
    warmup_teacher_temp_steps: int = 0   # DINO: linear warm-up of the teacher temperature
    student_temp: float = 0.1            # DINO: student softmax temperature
    center_momentum: float = 0.9         # DINO: EMA of the teacher-output centre
    momentum_teacher: float = 0.996      # DINO: EMA momentum at step 0, cosine to 1 at max_steps
    freeze_last_layer_steps: int = 0     # DINO: steps the head's last layer stays fixed
    # DINO: collapse floor as a fraction of 1/sqrt(d): fresh models measured 0.3-0.8, a uniform
    # collapse of a BatchNorm ResNet only fell to 0.07-0.11 (BN keeps outputs slightly apart).
    collapse_std_min: float = 0.1
    collapse_patience: int = 5           # DINO: logged rows under the floor before the run stops

    def __post_init__(self) -> None:
        # The name is checked against the registry by pretrain/resolve.py: a config module
        # that imported the methods would make config and methods one import circle.
        _check(self.temperature > 0, "method.temperature must be > 0 (SimCLR uses ~0.1-0.5)")
        _check(0.0 < self.mask_ratio < 1.0, f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for key in ("proj_hidden_dim", "proj_output_dim", "decoder_dim", "decoder_depth", "decoder_heads",
                    "head_hidden_dim", "head_bottleneck_dim", "head_output_dim", "collapse_patience"):
            _check(getattr(self, key) >= 1, f"method.{key} must be >= 1")
        _check(self.decoder_dim % self.decoder_heads == 0,
               "method.decoder_dim must be divisible by method.decoder_heads")
        for key in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            _check(getattr(self, key) > 0, f"method.{key} must be > 0")
        for key in ("center_momentum", "momentum_teacher"):
            _check(0 <= getattr(self, key) <= 1, f"method.{key} must be in [0, 1]")
        for key in ("warmup_teacher_temp_steps", "freeze_last_layer_steps", "collapse_std_min"):
            _check(getattr(self, key) >= 0, f"method.{key} must be >= 0")


@dataclass
class AugmentConfig:
    """Batched on-device augmentation; ``None`` means "the method's default" (see methods/)."""

    crop_size: int = 224                        # output side in px (2-D)
    volume_crop_size: int = 96                  # output cube side in voxels (volumes, model.arch monai:<Net>)
    scale: tuple[float, float] | None = None    # crop area as a fraction of the loaded image
    ratio: tuple[float, float] = (0.75, 4 / 3)  # crop aspect ratio range
    hflip_p: float | None = None                # probability of a left-right flip
    vflip_p: float | None = None                # probability of an up-down flip
    # Volumes: flip probability per RAS axis (left-right, posterior-anterior, inferior-superior);
    # hflip_p/vflip_p are the 2-D ones.
    flip_axes_p: tuple[float, float, float] | None = None
    rotate_degrees: float | None = None         # uniform in [-d, d] (volumes: about each axis)
    window_center_jitter: float | None = None   # shift of the window centre, fraction of its width
    window_width_jitter: float | None = None    # relative change of the window width
    intensity_p: float | None = None            # probability of brightness/contrast/gamma
    brightness: float | None = None             # additive, in [0,1] display units
    contrast: float | None = None               # multiplicative about the image mean, 1 +- c
    gamma: float | None = None                  # gamma in [1/(1+g), 1+g]
    blur_p: float | None = None                 # probability of a Gaussian blur
    blur_sigma: tuple[float, float] | None = None   # px (voxels) at crop_size (volume_crop_size)
    noise_p: float | None = None                # probability of added Gaussian noise
    noise_std: float | None = None              # max Gaussian noise std, in [0,1] display units
    # Multi-crop (DINO): local crops cut on the device from the same decoded image, after the
    # two global ones; the CPU loader does not change with their number.
    local_crops: int = 0                        # local crops per image (0: none)
    local_crop_size: int = 96                   # their side in px
    local_scale: tuple[float, float] = (0.05, 0.4)   # their area as a fraction of the loaded image
    mean: float = 0.5                           # normalisation after windowing to [0,1]
    std: float = 0.25                           # normalisation: (x - mean) / std

    def __post_init__(self) -> None:
        _check(self.crop_size >= 8, f"augment.crop_size must be >= 8 px, got {self.crop_size}")
        _check(self.volume_crop_size >= 8, f"augment.volume_crop_size must be >= 8 voxels, got {self.volume_crop_size}")
        if self.flip_axes_p is not None:
            _check(len(self.flip_axes_p) == 3 and all(0.0 <= p <= 1.0 for p in self.flip_axes_p),
                   f"augment.flip_axes_p is three probabilities in [0, 1] (x, y, z), got {self.flip_axes_p}")
        if self.scale is not None:
            lo, hi = self.scale
            _check(0 < lo <= hi <= 1, f"augment.scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        _check(0 < self.ratio[0] <= self.ratio[1], f"augment.ratio must be 0 < min <= max, got {self.ratio}")
        for key in ("hflip_p", "vflip_p", "intensity_p", "blur_p", "noise_p"):
            v = getattr(self, key)
            _check(v is None or 0.0 <= v <= 1.0, f"augment.{key} is a probability in [0, 1], got {v}")
        for key in ("rotate_degrees", "window_center_jitter", "window_width_jitter", "brightness",
                    "contrast", "gamma", "noise_std"):
            v = getattr(self, key)
            _check(v is None or v >= 0, f"augment.{key} must be >= 0, got {v}")
        _check(self.window_width_jitter is None or self.window_width_jitter < 1,
               "augment.window_width_jitter must be < 1 (a relative change of the window width)")
        _check(self.contrast is None or self.contrast < 1, "augment.contrast must be < 1")
        if self.blur_sigma is not None:
            _check(0 < self.blur_sigma[0] <= self.blur_sigma[1],
                   f"augment.blur_sigma must be 0 < min <= max, got {self.blur_sigma}")
        _check(self.std > 0, "augment.std must be > 0")
        _check(self.local_crops >= 0, "augment.local_crops must be >= 0")
        _check(not self.local_crops or 8 <= self.local_crop_size <= self.crop_size,
               f"augment.local_crop_size must be in [8, crop_size={self.crop_size}], got {self.local_crop_size}")
        lo, hi = self.local_scale
        _check(0 < lo <= hi <= 1, f"augment.local_scale must satisfy 0 < min <= max <= 1, got {self.local_scale}")


@dataclass
class TrainConfig:
    max_steps: int = 1000                  # optimizer steps; may grow on resume
    batch_size: int = 256                  # GLOBAL: across ranks and accumulation micro-steps
    grad_accum: int = 1                    # micro-batches per optimizer step
    lr: float | None = None                # base lr per 256 samples; scaled by batch_size / 256
    optimizer: Literal["auto", "lars", "adamw", "sgd"] = "auto"   # auto: the method's default
    weight_decay: float | None = None      # None: the method's default
    momentum: float = 0.9                  # lars / sgd
    betas: tuple[float, float] = (0.9, 0.95)   # adamw
    warmup_steps: int = 0                  # linear warm-up before the cosine decay
    min_lr_ratio: float = 0.0              # cosine decays to lr * min_lr_ratio
    clip_grad_norm: float = 0.0            # 0 disables clipping (the norm is still checked)
    # auto: bf16 on GPU, no on CPU. bool only because YAML reads a bare `no` as false.
    precision: Literal["auto", "bf16", "fp16", "no"] | bool = "auto"
    compile: bool = False                  # torch.compile the model
    sync_batchnorm: bool = True            # several GPUs: BatchNorm statistics over the global batch
    channels_last: bool = True             # NHWC memory layout (faster convolutions); volumes: NDHWC
    log_every: int = 10                    # steps between metrics.jsonl lines
    checkpoint_every: int = 500            # steps between checkpoints
    keep_checkpoints: int = 3              # newest checkpoints kept on disk
    max_nonfinite_steps: int = 5           # consecutive skipped steps before the run stops
    # Label-free monitoring (pretrain/monitor.py): RankMe (and kNN when labelled) on a fixed
    # batch of the shards' val split every eval_every steps; 0 turns it off.
    eval_every: int = 0
    # RankMe is at most min(eval_samples, embedding width): compare it within one run only.
    eval_samples: int = 256                # val samples in that batch

    def __post_init__(self) -> None:
        if self.precision is False:
            self.precision = "no"
        _check(self.precision is not True, "train.precision must be one of auto | bf16 | fp16 | no")
        _check(self.max_steps >= 1, "train.max_steps must be >= 1")
        _check(self.batch_size >= 2, "train.batch_size (global) must be >= 2")
        _check(self.grad_accum >= 1, "train.grad_accum must be >= 1")
        _check(self.batch_size % self.grad_accum == 0,
               f"train.batch_size {self.batch_size} must be divisible by train.grad_accum {self.grad_accum}")
        _check(self.lr is None or self.lr > 0, "train.lr must be > 0")
        _check(self.weight_decay is None or self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(0 <= self.warmup_steps < self.max_steps or self.max_steps == 1,
               f"train.warmup_steps must be in [0, max_steps), got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        _check(self.clip_grad_norm >= 0, "train.clip_grad_norm must be >= 0 (0 disables)")
        _check(self.log_every >= 1, "train.log_every must be >= 1")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every must be >= 1")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1")
        _check(self.eval_every >= 0, "train.eval_every must be >= 0 (0 turns the monitor off)")
        _check(self.eval_samples >= 2, "train.eval_samples must be >= 2")


@dataclass
class LoggingConfig:
    wandb: Literal["online", "offline", "disabled"] = "disabled"   # Weights & Biases mode
    project: str = "medssl"                # Weights & Biases project
    run_name: str | None = None            # Weights & Biases run name (None: generated)
    progress: bool = True                  # tqdm bar on rank zero


@dataclass
class DebugConfig:
    """Hooks for tests; leave at defaults for real runs."""

    nan_at_steps: list[int] = field(default_factory=list)   # make the loss NaN at these (1-based) steps
    dump_rank_weights: bool = False   # each rank writes debug/rank{R}.safetensors at the end
    step_sleep: float = 0.0           # seconds slept per step, so a test can signal mid-run
    nan_weights_at_step: int = 0      # after this (1-based) step, set one weight to NaN (0: never)


@dataclass
class PretrainConfig:
    output_dir: str = ""           # the run dir; a re-run of the same command resumes from it
    seed: int = 0                  # every random draw is a function of (seed, step, rank)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "output_dir must be set (the run dir; a re-run resumes from it)")
        _check(bool(self.data.shards), "data.shards must name a shard folder, glob or brace pattern")
        if is_volume_arch(self.model.arch):
            _check(self.augment.volume_crop_size <= self.data.volume_size,
                   f"augment.volume_crop_size {self.augment.volume_crop_size} must be <= data.volume_size "
                   f"{self.data.volume_size}")
        else:
            _check(self.augment.crop_size <= self.data.load_size,
                   f"augment.crop_size {self.augment.crop_size} must be <= data.load_size {self.data.load_size}")


def scaled_lr(cfg: TrainConfig) -> float:
    """Peak learning rate: ``train.lr`` is per 256 samples, scaled linearly by the global batch."""
    assert cfg.lr is not None
    return cfg.lr * cfg.batch_size / 256.0


def cosine_factor(step: int, cfg: TrainConfig) -> float:
    """LR multiplier at ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
