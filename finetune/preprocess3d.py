"""Volumes of a split -> normalised float batches ``[B, C, X, Y, Z]`` for one 3-D initialisation.

The 3-D counterpart of finetune/preprocess.py, same rules: volume shards go stored uint16 ->
modality units (offset/slope) -> the sample's own window (the ssl init's published one for a
sample without, min..max otherwise) -> [0, 1]; 3-D MedMNIST is uint8 / 255. Then each volume
is resized to the init's input cube (trilinear) and normalised with the init's mean/std;
channels are repeated when an init takes more than the data has.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finetune.inits import InitSource
from finetune.preprocess import Preprocessor
from finetune.tasks import Split


class VolumePreprocessor:
    """Callable ``(split, indices) -> float32 tensor [B, C, X, Y, Z]`` for one init."""

    def __init__(self, source: InitSource) -> None:
        if source.input_size is None or len(source.input_size) != 3:
            raise ValueError(f"{source.label}: a 3-D init needs an (X, Y, Z) input cube")
        self.source = source
        self.cube = tuple(int(v) for v in source.input_size)
        self.mean = torch.tensor(source.mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(source.std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    def __call__(self, split: Split, indices: np.ndarray) -> torch.Tensor:
        if isinstance(split.images, np.ndarray):   # MedMNIST uint8 [N, C, X, Y, Z]: one batched op
            batch = self._resize(torch.from_numpy(split.images[np.asarray(indices)]).float() / 255.0)
        else:   # volume shards: sizes may differ, so each is resized before stacking
            batch = torch.cat([self._resize(self._unit(split, int(i))) for i in indices])
        batch = batch.clamp_(0, 1)
        if batch.shape[1] != self.source.in_chans:
            if batch.shape[1] != 1:
                raise ValueError(f"cannot map {batch.shape[1]} channels to {self.source.in_chans}")
            batch = batch.expand(-1, self.source.in_chans, -1, -1, -1)
        return (batch - self.mean) / self.std

    def _resize(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[2:]) == self.cube:
            return batch
        return F.interpolate(batch, size=self.cube, mode="trilinear", align_corners=False)

    # Volume ``i`` as float32 ``[1, C, X, Y, Z]`` in [0, 1]: the 2-D rule, unchanged.
    _unit = Preprocessor._unit
