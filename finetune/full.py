"""Full fine-tuning: backbone + linear head, AdamW with a cosine schedule, early stopping on
validation AUC; the test scores are those of the best validation epoch.

A plain loop (no trainer framework): one device, no data workers, since images are already in
memory and MedMNIST-sized batches are cheap to assemble.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from finetune.config import FinetuneConfig
from finetune.metrics import evaluate
from finetune.tasks import Split, TaskData

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, n_out: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def predict(model: nn.Module, split: Split, prep: Callable, device: torch.device,
            batch_size: int, multilabel: bool) -> np.ndarray:
    """Probabilities ``[N, n_out]``: softmax, or sigmoid per label for multi-label."""
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        x = prep(split, np.arange(start, min(start + batch_size, len(split)))).to(device)
        logits = model(x).float()
        out.append((logits.sigmoid() if multilabel else logits.softmax(dim=1)).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def run_finetune(make_backbone: Callable[[], nn.Module], task: TaskData, train_idx: np.ndarray,
                 prep: Callable, cfg: FinetuneConfig, device: torch.device, seed: int,
                 eval_batch_size: int, keep_best: bool = False) -> dict:
    """Train on ``train_idx`` of the train split; returns the best epoch's test and validation
    scores, and the history.

    ``keep_best``: also return the best epoch's weights (``best_state``, a CPU state dict of
    the ``Classifier``), for explanations of exactly the model that was scored.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    multilabel = task.multilabel
    model = Classifier(make_backbone(), task.n_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    train, labels = task.splits["train"], task.splits["train"].labels
    best_auc, best_epoch, best_test, best_val, stale, history = -math.inf, -1, None, None, 0, []
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(train_idx)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2 and len(order) > 1:
                continue  # a batch of one breaks BatchNorm in train mode
            x = prep(train, idx).to(device)
            if cfg.hflip:
                flip = torch.rand(len(x), device=device) < 0.5
                # Left-right: the width axis of an image, the RAS x axis (dim 2) of a volume.
                axis = 2 if x.dim() == 5 else -1
                x = torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(axis), x)
            y = torch.from_numpy(labels[idx]).to(device)
            y = y.float() if multilabel else y[:, 0].long()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        val = predict(model, task.splits["val"], prep, device, eval_batch_size, multilabel)
        val_auc, _ = evaluate(task.splits["val"].labels, val, task.task)
        history.append({"epoch": epoch, "loss": total / max(len(order), 1), "val_auc": val_auc})
        log.debug("finetune %s epoch %d loss %.4f val AUC %.4f", task.name, epoch, history[-1]["loss"], val_auc)
        if val_auc > best_auc or best_test is None:
            best_auc, best_epoch, best_val, stale = val_auc, epoch, val, 0
            # Scoring test at each improvement equals restoring the best weights at the end,
            # without keeping a second copy of the model.
            best_test = predict(model, task.splits["test"], prep, device, eval_batch_size, multilabel)
            if keep_best:
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    out = {"test_scores": best_test, "val_scores": best_val, "chosen": {"best_epoch": best_epoch, "epochs_run": len(history)},
           "val_auc": float(best_auc), "history": history}
    if keep_best:
        out["best_state"] = best_state
    return out
