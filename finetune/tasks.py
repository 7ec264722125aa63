"""Downstream tasks as in-memory splits: MedMNIST npz files (via ``medmnist``) or labeled shards.

A task gives, per split, the images at their stored dtype and size, labels in medmnist's
layout (``[N, 1]`` integer for binary/multi-class, ``[N, L]`` 0/1 for multi-label), patient
pseudonyms when the source has them, and the task type string medmnist's evaluator uses
('binary-class', 'multi-class', 'multi-label, binary-class', 'ordinal-regression').
Intensity mapping to [0, 1] depends on the initialisation, so it happens later
(``finetune/preprocess.py``), not here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.config import TaskConfig
from finetune.config3d import MEDMNIST_3D
from finetune.evaluation_config import ATTRIBUTES
from finetune.subgroups import attribute_values
from finetune.tasks3d import medmnist_volumes, shrink_volume
from medssl.errors import MedsslError
from medssl.sample import ShardSample

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SHARD_TASK_TYPES = {"binary": "binary-class", "multiclass": "multi-class", "multilabel": "multi-label, binary-class"}


@dataclass
class Split:
    """One split. ``images``: uint8 ``[N, H, W, C]`` (MedMNIST) or a list of ``[C, H, W]`` arrays
    (shards: uint16 grayscale or uint8 RGB); 3-D: uint8 ``[N, C, X, Y, Z]`` (MedMNIST) or a list
    of uint16 ``[1, X, Y, Z]`` volumes (finetune/tasks3d.py). ``windows``: per-sample ``(center, width)`` in
    modality units for grayscale shards, else None. ``labels``: ``[N, L]`` int64."""

    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    patients: np.ndarray | None = None
    intensity: list[tuple[float, float]] | None = None   # (offset, slope) per sample
    windows: list[tuple[float, float] | None] | None = None
    #: Per-sample categorical attributes (``evaluation_config.ATTRIBUTES``: sex, age band, site,
    #: view): name -> ``[N]`` object array of str, None where a sample does not record it. Only
    #: names some sample records are present; MedMNIST has none.
    attributes: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        """The samples at ``idx`` (``[M]`` int) as a split of their own, every field alike."""
        idx = np.asarray(idx, dtype=np.int64)

        def pick(v):
            return None if v is None else [v[i] for i in idx]

        images = self.images[idx] if isinstance(self.images, np.ndarray) else pick(self.images)
        return Split(images=images, labels=self.labels[idx],
                     patients=None if self.patients is None else self.patients[idx],
                     intensity=pick(self.intensity), windows=pick(self.windows),
                     attributes={k: v[idx] for k, v in self.attributes.items()})


@dataclass
class TaskData:
    name: str
    task: str              # medmnist task string
    n_classes: int         # output columns of a score matrix (labels for multi-label)
    channels: int          # 1 or 3
    source: str            # "medmnist" | "grayscale-shards" | "rgb-shards" | "volume-shards"
    splits: dict[str, Split] = field(default_factory=dict)
    #: What defines the task's data, for cell keys (MedMNIST: flag, size and split sizes, as the
    #: official files are fixed; shards: every shard's sha256 from index.json).
    fingerprint: dict = field(default_factory=dict)
    spatial_dims: int = 2  # 3 for volumes

    @property
    def multilabel(self) -> bool:
        return self.task == "multi-label, binary-class"


def load_task(cfg: TaskConfig, side: int | None = None) -> TaskData:
    """Load all three splits of a task into memory; raises MedsslError naming the missing file.

    ``side``: shard images larger than ``side`` px are shrunk to ``side x side`` on the way in
    (antialiased, at their stored dtype), so a CheXpert-sized task holds N x side^2 x 2 bytes
    instead of its full-resolution slices. The stored-value -> modality-unit map is affine, so
    resizing before windowing equals resizing after it, up to the clip at the window edges.
    """
    if cfg.kind == "medmnist":
        return _load_medmnist(cfg)
    return _load_shards(cfg, side)


def _load_medmnist(cfg: TaskConfig) -> TaskData:
    import medmnist

    info = medmnist.INFO[cfg.flag]
    suffix = "" if cfg.size == 28 else f"_{cfg.size}"
    npz = Path(cfg.root) / f"{cfg.flag}{suffix}.npz"
    if not npz.is_file():
        raise MedsslError(
            f"tasks: {cfg.name}: {npz} not found; download it from {info['url' + suffix].split('?')[0]} "
            f"(or `python -m medmnist download`) into {cfg.root}"
        )
    cls = getattr(medmnist, info["python_class"])
    volume = cfg.flag in MEDMNIST_3D
    splits = {}
    for split in SPLITS:
        ds = cls(split=split, root=str(cfg.root), size=cfg.size, download=False)
        try:
            len(ds)  # medmnist asserts the official split size here
        except AssertionError:
            raise MedsslError(
                f"tasks: {cfg.name}: {npz} has {ds.imgs.shape[0]} {split} images, medmnist expects "
                f"{info['n_samples'][split]}; the file is not the official {cfg.flag}{suffix}.npz"
            ) from None
        imgs = np.asarray(ds.imgs)
        if volume:
            imgs = medmnist_volumes(imgs)
        elif imgs.ndim == 3:
            imgs = imgs[..., None]
        splits[split] = Split(images=imgs, labels=np.asarray(ds.labels).astype(np.int64).reshape(len(imgs), -1))
    task = info["task"]
    n_classes = len(info["label"])
    return TaskData(
        name=cfg.name, task=task, n_classes=n_classes, channels=int(info["n_channels"]),
        source="medmnist", splits=splits,
        fingerprint={"kind": "medmnist", "flag": cfg.flag, "size": cfg.size,
                     "n": {s: len(v) for s, v in splits.items()}},
        spatial_dims=3 if volume else 2,
    )


def _shrink(image: np.ndarray, side: int | None) -> np.ndarray:
    """``[C, H, W]`` uint8/uint16 -> ``[C, side, side]`` same dtype, when larger than ``side``
    (a ``[C, X, Y, Z]`` volume: finetune/tasks3d.py)."""
    if image.ndim == 4:
        return shrink_volume(image, side)
    if side is None or (image.shape[1] <= side and image.shape[2] <= side):
        return image
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(image.astype(np.float32))[None]
    t = F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0]
    info = np.iinfo(image.dtype)
    return t.round().clamp(info.min, info.max).numpy().astype(image.dtype)


def _load_shards(cfg: TaskConfig, side: int | None = None) -> TaskData:
    root = Path(cfg.path)
    index = _read_index(root)
    labels_info = index.get("labels")
    if not labels_info:
        raise MedsslError(f"tasks: {cfg.name}: {root}/index.json has no labels; shard with a --recipe that gives labels")
    kind = labels_info.get("type")
    if kind not in SHARD_TASK_TYPES:
        raise MedsslError(f"tasks: {cfg.name}: {root}/index.json labels.type {kind!r} is not binary|multiclass|multilabel")
    names = list(labels_info.get("names") or [])
    n_classes = len(names) if names else 2
    splits: dict[str, Split] = {}
    channels = None
    dims: set[bool] = set()
    for split in SPLITS:
        images, labels, patients, intensity, windows, attrs = [], [], [], [], [], []
        for sample in _iter_split(root, split):
            if sample.label is None:
                raise MedsslError(f"tasks: {cfg.name}: a {split} sample in {root} has no label")
            images.append(_shrink(sample.image, side))
            labels.append(list(sample.label) if kind == "multilabel" else [int(sample.label)])
            patients.append(str(sample.patient or ""))
            intensity.append((sample.offset, sample.slope))
            windows.append(sample.window)
            attrs.append(_attributes(sample))
            channels = channels or sample.channels
            dims.add(sample.is_volume)
        if not images:
            raise MedsslError(f"tasks: {cfg.name}: {root} has no {split} samples; re-shard with a {split} split")
        lab_arr = np.asarray(labels, dtype=np.int64)
        pat = np.asarray(patients) if all(patients) else None
        splits[split] = Split(images=images, labels=lab_arr, patients=pat,
                              intensity=intensity if channels == 1 else None,
                              windows=windows if channels == 1 else None,
                              attributes=_attribute_arrays(attrs))
    if len(dims) > 1:
        raise MedsslError(f"tasks: {cfg.name}: {root} mixes 2-D images and volumes; shard them apart")
    volume = dims == {True}
    if kind == "multiclass":
        seen = int(max(s.labels.max() for s in splits.values())) + 1
        n_classes = max(n_classes, seen)
    elif kind == "multilabel":
        n_classes = splits["train"].labels.shape[1]
    return TaskData(
        name=cfg.name, task=SHARD_TASK_TYPES[kind], n_classes=n_classes, channels=int(channels or 1),
        source="volume-shards" if volume else "grayscale-shards" if channels == 1 else "rgb-shards",
        splits=splits, spatial_dims=3 if volume else 2,
        # Content, not location: a moved shard folder keeps its finished cells.
        fingerprint={"kind": "shards",
                     "shards": sorted((k, v.get("sha256")) for k, v in index.get("shards", {}).items())},
    )


def _attributes(sample: ShardSample) -> dict[str, str]:
    """The evaluation attributes one ``ShardSample`` records. The view is a top-level field
    of the sample contract; an ``attributes["view"]`` would take precedence. Names outside
    ``ATTRIBUTES`` are not read: nothing but these categorical, de-identified values can reach a
    result."""
    found = {k: v for k, v in sample.attributes.items() if k in ATTRIBUTES}
    if "view" not in found and sample.view:
        found["view"] = sample.view
    return found


def _attribute_arrays(per_sample: list[dict[str, str]]) -> dict[str, np.ndarray]:
    """name -> ``[N]`` object array (str, None where missing), for the names any sample has."""
    names = sorted({k for a in per_sample for k in a})
    return {k: attribute_values([a.get(k) for a in per_sample]) for k in names}


def _read_index(root: Path) -> dict:
    from medssl.data.shards import read_index

    return read_index(root)


def _iter_split(root: Path, split: str):
    """Yield the ``ShardSample``s of one split via the shared shard reader."""
    from medssl.data.shards import iter_samples, list_shards

    yield from iter_samples(list_shards(str(root), split))
