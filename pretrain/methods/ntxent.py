"""NT-Xent whose negatives leave out the other images of each sample's patient (MICLe).

With ``data.positives: same_patient`` a pair is two images of one patient (Azizi et al. 2021,
https://arxiv.org/abs/2101.05224), and the batch can hold more images of that patient: as
negatives they would push apart what the pairs pull together. Each sample's ``group`` (a
patient id, pretrain/pairs.py) masks every other view of its group out of its softmax; the
pair's own other view stays the positive. Negatives come from every rank, as in lightly's
``NTXentLoss(gather_distributed=True)``, which this equals when all groups differ
(tests/pretrain/test_positives.py checks it against lightly).
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from lightly.utils import dist


def _gather_groups(groups: torch.Tensor) -> torch.Tensor:
    if dist.world_size() == 1:
        return groups
    out = [torch.empty_like(groups) for _ in range(dist.world_size())]
    torch_dist.all_gather(out, groups.contiguous())
    return torch.cat(out)


def masked_ntxent(z0: torch.Tensor, z1: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean NT-Xent over both views of ``z0``/``z1`` ``[B, D]``; ``groups`` int64 ``[B]``."""
    n = z0.shape[0]
    z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    if dist.world_size() > 1:   # lightly's gather keeps the gradient of this rank's slice
        all0, all1 = torch.cat(dist.gather(z0)), torch.cat(dist.gather(z1))
    else:
        all0, all1 = z0, z1
    all_groups = _gather_groups(groups)
    m = all0.shape[0]
    mine = torch.arange(n, device=z0.device) + dist.rank() * n        # this rank's rows, globally
    anchors, columns = torch.cat([z0, z1]), torch.cat([all0, all1])
    logits = anchors @ columns.T / temperature                        # [2n, 2m]
    row_sample = mine.repeat(2)
    col_sample = torch.arange(m, device=z0.device).repeat(2)
    row_view = torch.arange(2, device=z0.device).repeat_interleave(n)
    col_view = torch.arange(2, device=z0.device).repeat_interleave(m)
    same_sample = row_sample[:, None] == col_sample[None, :]
    positive = same_sample & (row_view[:, None] != col_view[None, :])
    same_group = groups.repeat(2)[:, None] == all_groups.repeat(2)[None, :]
    # Out: the anchor itself, and every other view of its group but the positive.
    masked = (same_sample & ~positive) | (same_group & ~same_sample)
    logits = logits.masked_fill(masked, float("-inf"))
    labels = positive.float().argmax(dim=1)
    return F.cross_entropy(logits, labels)
