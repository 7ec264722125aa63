"""Images of a split -> normalised float batches ``[B, C, S, S]`` for one initialisation.

Grayscale scans: stored uint16 -> modality units (offset/slope) -> window (the ssl init's
published window, else the sample's own; min-max when neither exists) -> [0, 1].
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


class Preprocessor:
    """Callable ``(split, indices) -> float32 tensor [B, C, S, S]`` for one init."""

    def __init__(self, source: InitSource, input_size: int, interpolation: str) -> None:
        self.source = source
        self.size = input_size
        self.mode = interpolation
        self.mean = torch.tensor(source.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(source.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, split: Split, indices: np.ndarray) -> torch.Tensor:
        images = [self._unit(split, int(i)) for i in indices]
        out = []
        for img in images:  # sources may differ in size, so resize one by one before stacking
            t = torch.from_numpy(img)[None]
            if t.shape[-1] != self.size or t.shape[-2] != self.size:
                kwargs = {} if self.mode == "nearest" else {"align_corners": False, "antialias": True}
                t = F.interpolate(t, size=(self.size, self.size), mode=self.mode, **kwargs)
            out.append(t)
        batch = torch.cat(out).clamp_(0, 1)
        batch = _match_channels(batch, self.source.in_chans)
        return (batch - self.mean) / self.std

    def _unit(self, split: Split, i: int) -> np.ndarray:
        """Sample ``i`` as float32 ``[C, H, W]`` in [0, 1]."""
        if isinstance(split.images, np.ndarray):  # MedMNIST [N, H, W, C] uint8
            return np.ascontiguousarray(split.images[i].transpose(2, 0, 1), dtype=np.float32) / 255.0
        img = split.images[i]
        if img.dtype == np.uint8:
            return img.astype(np.float32) / 255.0
        offset, slope = split.intensity[i] if split.intensity else (0.0, 1.0)
        values = img.astype(np.float32) * slope + offset
        window = self.source.window or (split.windows[i] if split.windows else None)
        if window is None:
            lo, hi = float(values.min()), float(values.max())
        else:
            lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
        return (values - lo) / max(hi - lo, 1e-6)


def _match_channels(batch: torch.Tensor, in_chans: int) -> torch.Tensor:
    if batch.shape[1] == in_chans:
        return batch
    if in_chans == 1:
        return batch.mean(dim=1, keepdim=True)
    if batch.shape[1] == 1:
        return batch.expand(-1, in_chans, -1, -1)
    raise ValueError(f"cannot map {batch.shape[1]} channels to {in_chans}")
