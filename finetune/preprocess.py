"""Images of a split -> normalised float batches ``[B, C, S, S]`` for one initialisation.

Grayscale scans: stored uint16 -> modality units (offset/slope) -> window -> [0, 1]. The
window is the sample's own, as in pretraining and the same for every init, so the comparison
stays fair; the ssl init's published window serves samples that carry none, min-max the rest.
MedMNIST and RGB shards: uint8 / 255. Then channels are matched to the init (RGB -> gray by
the channel mean; gray -> RGB by repetition), the image is resized to ``input_size`` with the
configured interpolation (nearest reproduces MedMNIST's upsampled "224"), and normalised with
the init's mean/std.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finetune.inits import InitSource
from finetune.tasks import Split
from medssl.sample import window_to_unit


class Preprocessor:
    """Callable ``(split, indices) -> float32 tensor [B, C, S, S]`` for one init."""

    def __init__(self, source: InitSource, input_size: int, interpolation: str) -> None:
        self.source = source
        self.size = input_size
        self.mode = interpolation
        self.mean = torch.tensor(source.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(source.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, split: Split, indices: np.ndarray) -> torch.Tensor:
        if isinstance(split.images, np.ndarray):  # MedMNIST [N, H, W, C] uint8: one batched op
            batch = torch.from_numpy(split.images[np.asarray(indices)]).permute(0, 3, 1, 2).float() / 255.0
            batch = self._resize(batch)
        else:
            images = [self._unit(split, int(i)) for i in indices]
            if len({tuple(t.shape) for t in images}) == 1:
                batch = self._resize(torch.cat(images))
            else:  # sources of different sizes: resize one by one before stacking
                batch = torch.cat([self._resize(t) for t in images])
        batch = _match_channels(batch.clamp_(0, 1), self.source.in_chans)
        return (batch - self.mean) / self.std

    def _resize(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[-1] == self.size and batch.shape[-2] == self.size:
            return batch
        kwargs = {} if self.mode == "nearest" else {"align_corners": False, "antialias": True}
        return F.interpolate(batch, size=(self.size, self.size), mode=self.mode, **kwargs)

    def _unit(self, split: Split, i: int) -> torch.Tensor:
        """Shard sample ``i`` as float32 ``[1, C, H, W]`` in [0, 1]."""
        img = split.images[i]
        if img.dtype == np.uint8:
            return torch.from_numpy(img.astype(np.float32) / 255.0)[None]
        offset, slope = split.intensity[i] if split.intensity else (0.0, 1.0)
        values = torch.from_numpy(img.astype(np.float32) * np.float32(slope) + np.float32(offset))[None]
        window = (split.windows[i] if split.windows else None) or self.source.window
        center, width = window if window is not None else (float("nan"), float("nan"))
        return window_to_unit(values, torch.tensor([center]), torch.tensor([width]))


def _match_channels(batch: torch.Tensor, in_chans: int) -> torch.Tensor:
    if batch.shape[1] == in_chans:
        return batch
    if in_chans == 1:
        return batch.mean(dim=1, keepdim=True)
    if batch.shape[1] == 1:
        return batch.expand(-1, in_chans, -1, -1)
    raise ValueError(f"cannot map {batch.shape[1]} channels to {in_chans}")
