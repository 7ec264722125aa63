"""DINO: a student matches an EMA teacher's centred, sharpened outputs across crops (lightly parts).

- Caron et al. 2021, https://arxiv.org/abs/2104.14294 (the RAD-DINO family builds on it)

The teacher sees the two global crops, the student every crop (``augment.local_crops`` more,
cut on the device from the same decoded image, pretrain/augment.py). The teacher is a deep
copy of the student, never the same object, with ``requires_grad=False``: only the EMA in
``after_optimizer_step`` moves it. It is also the published module (``backbone``), as in the
paper, where the teacher's features are the better ones. Everything that must survive a resume
is a parameter or buffer: both networks, lightly's centre, and the schedule step.
"""

from __future__ import annotations

import copy
import math
import warnings

import timm
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medssl.errors import ConfigError
from pretrain.config import PretrainConfig
from pretrain.methods import register_method

# SimCLR's scan-aware choices (no vertical flip, small rotations, mild intensity changes),
# with DINO's global-crop scale; local crops take augment.local_scale.
DINO_AUGMENT = dict(
    scale=(0.4, 1.0), hflip_p=0.5, vflip_p=0.0, flip_axes_p=(0.5, 0.0, 0.0), rotate_degrees=10.0,
    window_center_jitter=0.1, window_width_jitter=0.2,
    intensity_p=0.8, brightness=0.1, contrast=0.2, gamma=0.25,
    blur_p=0.5, blur_sigma=(0.1, 2.0), noise_p=0.2, noise_std=0.03,
)


class DINO(nn.Module):
    """Student (timm backbone + lightly DINO head), its EMA teacher, and lightly's DINOLoss."""

    def __init__(self, student: nn.Module, cfg: PretrainConfig):
        super().__init__()
        m = cfg.method
        self.student_backbone = student
        self.student_head = _head(student.num_features, cfg)
        self.backbone = copy.deepcopy(student)          # the teacher: published
        # weight_norm's derived weight cannot be deep-copied: a second head, given the same state.
        self.teacher_head = _head(student.num_features, cfg)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in (*self.backbone.parameters(), *self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.criterion = DINOLoss(output_dim=m.head_output_dim, warmup_teacher_temp=m.warmup_teacher_temp,
                                  teacher_temp=m.teacher_temp, student_temp=m.student_temp,
                                  center_momentum=m.center_momentum)
        self.warmup_teacher_temp, self.teacher_temp = m.warmup_teacher_temp, m.teacher_temp
        self.warmup_steps = m.warmup_teacher_temp_steps
        self.momentum_teacher, self.max_steps = m.momentum_teacher, cfg.train.max_steps
        self.collapse_std_min, self.collapse_patience = m.collapse_std_min, m.collapse_patience
        self.dim = m.head_output_dim   # the collapse floor is in units of 1/sqrt(head outputs)
        # The step the next forward belongs to (teacher temperature), kept as a buffer so a
        # checkpoint carries it, and as an int so reading it costs no host sync.
        self.register_buffer("schedule_step", torch.zeros((), dtype=torch.long))
        self._step = 0
        self._collapsed_rows = 0    # consecutive logged rows below the floor since this start

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._step = int(self.schedule_step)
        return result

    def after_backbone_init(self) -> None:
        """``model.init`` loaded weights into the teacher (``backbone``): the student starts equal."""
        self.student_backbone.load_state_dict(self.backbone.state_dict())

    def teacher_temperature(self, step: int) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up steps."""
        if step >= self.warmup_steps:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / self.warmup_steps

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``views``: two global ``[B, C, H, W]`` crops, then the local crops -> loss and the
        monitors ``collapse_std``, ``teacher_entropy`` and ``feature_std``."""
        globals_, b = views[:2], views[0].shape[0]
        with torch.no_grad():
            features = self.backbone(torch.cat(globals_))
            teacher = self.teacher_head(features).float()
        # One student pass per crop size (global, then local): fewer, larger batches.
        student = [self.student_head(self.student_backbone(torch.cat(globals_))).float()]
        if len(views) > 2:
            student.append(self.student_head(self.student_backbone(torch.cat(views[2:]))).float())
        student_out = [s for chunk in student for s in chunk.split(b)]
        return self._loss(teacher, student_out, features)

    # Outside torch.compile's graph: the temperature depends on the Python-int step, which a
    # compiled forward would guard on and recompile for at every warm-up step; lightly's
    # centre update all-reduces. The networks above stay compiled.
    @torch.compiler.disable
    def _loss(self, teacher: torch.Tensor, student_out: list[torch.Tensor], features: torch.Tensor
              ) -> dict[str, torch.Tensor]:
        b = student_out[0].shape[0]
        temp = self.teacher_temperature(self._step)
        centre = self.criterion.center.reshape(1, -1).clone()   # before the loss moves it
        loss = self.criterion(list(teacher.split(b)), student_out, teacher_temp=temp)
        with torch.no_grad():
            # Collapse shows as outputs that no longer vary across images: the per-dimension
            # std over the batch of the L2-normalised teacher outputs, ~1/sqrt(d) when spread
            # out, 0 when collapsed (to one dimension or to uniform). feature_std: the same for
            # the published backbone's features.
            collapse_std = F.normalize(teacher, dim=1).std(dim=0).mean()
            feature_std = F.normalize(features.float(), dim=1).std(dim=0).mean()
            # A teacher dominated by one dimension has a low entropy of its mean output.
            mean_p = F.softmax((teacher - centre) / temp, dim=1).mean(dim=0)
            entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
        return {"loss": loss, "collapse_std": collapse_std, "teacher_entropy": entropy, "feature_std": feature_std}

    def before_optimizer_step(self, step: int) -> None:
        # The last layer stays fixed for the first steps (the paper's first epoch): it keeps
        # the early, noisy targets from pulling the output layer into a collapsed solution.
        self.student_head.cancel_last_layer_gradients(step)
        self._step = step + 1
        self.schedule_step.fill_(step + 1)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        # Momentum rises from momentum_teacher to 1 on a cosine over the run (the paper).
        m = cosine_schedule(step, self.max_steps, self.momentum_teacher, 1.0)
        update_momentum(self.student_backbone, self.backbone, m)
        update_momentum(self.student_head, self.teacher_head, m)

    def check_health(self, row: dict) -> str | None:
        """Stop when the normalised-feature std stays under ``collapse_std_min / sqrt(d)``."""
        std = row.get("collapse_std")
        if std is None:
            return None
        floor = self.collapse_std_min / math.sqrt(self.dim)
        self._collapsed_rows = self._collapsed_rows + 1 if std < floor else 0
        if self._collapsed_rows < self.collapse_patience:
            return None
        return (f"DINO collapsed: collapse_std {std:.2e} below {floor:.2e} (method.collapse_std_min / "
                f"sqrt({self.dim})) for {self._collapsed_rows} logged steps in a row; lower train.lr, raise "
                "method.teacher_temp's warm-up (method.warmup_teacher_temp_steps) or method.momentum_teacher")


def _head(dim: int, cfg: PretrainConfig) -> DINOProjectionHead:
    m = cfg.method
    with warnings.catch_warnings():   # lightly's head uses the older weight_norm API
        warnings.simplefilter("ignore", FutureWarning)
        # No BatchNorm in the head: the paper's choice for ViTs, and it keeps CNN heads simple.
        return DINOProjectionHead(dim, m.head_hidden_dim, m.head_bottleneck_dim, m.head_output_dim,
                                  batch_norm=False, freeze_last_layer=m.freeze_last_layer_steps)


@register_method(
    "dino", n_views=2, optimizer="adamw",
    lr={"adamw": 5e-4, "default": 5e-4},
    weight_decay=0.04, augment=DINO_AUGMENT, multi_crop=True,
)
def build_dino(cfg: PretrainConfig) -> nn.Module:
    student = timm.create_model(cfg.model.arch, num_classes=0, in_chans=cfg.model.in_chans, **cfg.model.kwargs)
    size, local = cfg.augment.crop_size, cfg.augment.local_crop_size
    if (isinstance(student, VisionTransformer) and cfg.augment.local_crops and local != size
            and not getattr(student, "dynamic_img_size", False)):
        raise ConfigError(f"model.arch {cfg.model.arch!r} is a ViT with a fixed input size: local crops of "
                          f"{local} px need model.kwargs.dynamic_img_size=true")
    return DINO(student, cfg)
