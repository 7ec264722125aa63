"""Training stream from WebDataset shards: split by rank and worker, endless, restorable.

CPU workers only read tars, decode PNG (or a volume's ``vol.npy.gz``) and resize/centre-crop
to ``data.load_size`` (a volume: to the cube ``data.volume_size``, ``fit_cube``); every random
augmentation happens later on the accelerator (pretrain/augment.py, pretrain/augment3d.py).

Why not ``wds.WebDataset(..., resampled=True).with_epoch(n)``: its resampling draws from an
unseeded per-worker RNG, so a resumed run cannot replay the stream. Here each of the
``world_size * num_workers`` global workers owns a fixed, disjoint slice of the shards and
cycles through it forever, reshuffling the slice every pass with an RNG seeded by
(seed, pass, rank, worker) and shuffling samples in a buffer seeded by (seed, rank, worker).
The stream is thus a pure function of the seed, and never ends, so every rank always has a
batch (uneven epochs hang DDP). To resume after ``n`` batches, each worker skips the raw
(undecoded) samples of the batches it had already delivered: reading tar members is cheap,
decoding is not. The DataLoader hands out worker batches round-robin, so batch ``i`` comes
from logical worker ``i % num_workers`` (a resumed loader rotates its workers to keep that). webdataset still does the tar reading and buffered shuffle.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medssl.data.sample import VOLUME_MEMBER, decode_image, decode_volume
from medssl.data.shards import list_shards
from medssl.errors import MedsslError
from pretrain.pairs import PARTNER, same_patient_pairs

log = logging.getLogger(__name__)


def resolve_shards(spec: str, split: str = "train") -> list[str]:
    """Shard paths of ``spec``: a folder (its index.json's ``split``), a glob, or a brace pattern."""
    return [str(u) for u in list_shards(spec, split)]


def worker_shards(urls: list[str], rank: int, world_size: int, num_workers: int) -> list[list[str]]:
    """Disjoint shard slices of one rank's workers: ``[worker][shard]``.

    Raises MedsslError when some worker would get none (a rank without data hangs DDP).
    """
    nw = max(1, num_workers)
    total = world_size * nw
    if len(urls) < total:
        raise MedsslError(
            f"data.shards: {len(urls)} shards for {world_size} ranks x {nw} workers = {total} "
            f"readers; every reader needs at least one shard: lower data.num_workers or reshard "
            f"with a smaller --shard-size"
        )
    return [urls[rank * nw + w::total] for w in range(nw)]


def batches_before(consumed: int, worker: int, num_workers: int) -> int:
    """How many of the first ``consumed`` loader batches came from ``worker`` (round-robin)."""
    return max(0, (consumed - worker + num_workers - 1) // num_workers)


def fit_cube(volume: np.ndarray, size: int, fit: str = "crop") -> np.ndarray:
    """uint16 ``[C, X, Y, Z]`` -> uint16 ``[C, size, size, size]``, deterministic (DataConfig).

    ``crop``: the centred cube of the shortest side; ``pad``: the volume centred in a cube of
    its longest side, filled with its lowest stored value. Then one resize to ``size``: area
    averaging when shrinking (3-D interpolation has no antialias; plain trilinear would
    alias), trilinear when growing.
    """
    c, *sides = volume.shape
    if fit == "crop":
        m = min(sides)
        starts = [(n - m) // 2 for n in sides]
        cube = volume[:, starts[0]:starts[0] + m, starts[1]:starts[1] + m, starts[2]:starts[2] + m]
    else:
        m = max(sides)
        cube = np.full((c, m, m, m), volume.min(), dtype=volume.dtype)
        starts = [(m - n) // 2 for n in sides]
        cube[:, starts[0]:starts[0] + sides[0], starts[1]:starts[1] + sides[1],
             starts[2]:starts[2] + sides[2]] = volume
    if m == size:
        return np.ascontiguousarray(cube)
    t = torch.from_numpy(cube.astype(np.float32))[None]
    if m > size:
        t = F.interpolate(t, size=(size,) * 3, mode="area")
    else:
        t = F.interpolate(t, size=(size,) * 3, mode="trilinear", align_corners=False)
    return t[0].round_().clamp_(0, 65535).numpy().astype(np.uint16)


def load_sample(sample: dict[str, Any], load_size: int, volume_fit: str = "crop") -> dict[str, Any]:
    """Decode one raw shard sample to a fixed ``[C, load_size, load_size]`` integer tensor, or,
    for a volume sample (``vol.npy.gz``), to ``[C, load_size, load_size, load_size]``.

    Deterministic on purpose (short side resized to ``load_size``, centre crop; volumes:
    ``fit_cube``): the random crop happens on the accelerator. uint16 is carried as int16
    bits (torch has few uint16 ops; the device reinterprets them), halving the copy against
    int32. The result's ``volume`` says which kind it was.
    """
    meta = json.loads(sample["json"])
    volume = VOLUME_MEMBER in sample
    if volume:
        image = fit_cube(decode_volume(sample[VOLUME_MEMBER]), load_size, volume_fit)
    else:
        image = _fit_square(decode_image(sample["png"] if "png" in sample else sample["img.png"]), load_size)
    if image.dtype == np.uint16:
        tensor = torch.from_numpy(np.array(image, copy=True).view(np.int16))
    else:
        tensor = torch.from_numpy(np.array(image, copy=True))
    intensity = meta.get("intensity") or {}
    window = meta.get("window") or {}
    nan = float("nan")
    return {
        "image": tensor,
        "volume": volume,
        "offset": float(intensity.get("offset", 0.0)),
        "slope": float(intensity.get("slope", 1.0)),
        "center": float(window["center"]) if window.get("center") is not None else nan,
        "width": float(window["width"]) if window.get("width") is not None else nan,
    }


def _fit_square(image: np.ndarray, load_size: int) -> np.ndarray:
    """``[C, H, W]`` -> ``[C, load_size, load_size]``: short side resized, centre crop."""
    _, h, w = image.shape
    if (h, w) == (load_size, load_size):
        return image
    t = torch.from_numpy(image.astype(np.float32))[None]
    scale = load_size / min(h, w)
    nh, nw = max(load_size, round(h * scale)), max(load_size, round(w * scale))
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - load_size) // 2, (nw - load_size) // 2
    t = t[0, :, top:top + load_size, left:left + load_size]
    hi = 65535 if image.dtype == np.uint16 else 255
    return t.round_().clamp_(0, hi).numpy().astype(image.dtype)


_SCALARS = ("offset", "slope", "center", "width")


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {"image": torch.stack([s["image"] for s in samples]),
             **{k: torch.tensor([s[k] for s in samples], dtype=torch.float32) for k in _SCALARS}}
    if "group" in samples[0]:   # same-patient pairs (data.positives)
        batch[PARTNER + "image"] = torch.stack([s[PARTNER + "image"] for s in samples])
        batch.update({PARTNER + k: torch.tensor([s[PARTNER + k] for s in samples], dtype=torch.float32)
                      for k in _SCALARS})
        batch["group"] = torch.tensor([s["group"] for s in samples], dtype=torch.int64)
        batch["pair_cross"] = torch.tensor([s["pair_cross"] for s in samples], dtype=torch.float32)
    return batch


class ShardStream(IterableDataset):
    """Endless batches ``{"image": [B, C, L, L], "offset"/"slope"/"center"/"width": [B]}``
    (``volume=True``: ``image`` ``[B, C, L, L, L]`` from volume shards).

    ``skip_batches``: loader batches already consumed by this rank (the resume position).
    """

    def __init__(self, urls: list[str], *, rank: int, world_size: int, num_workers: int, seed: int,
                 batch_size: int, load_size: int, in_chans: int, shuffle_buffer: int,
                 shuffle_initial: int, max_bad_samples: int, skip_batches: int = 0,
                 positives: str = "same_image", pair_buffer: int = 1000, volume: bool = False,
                 volume_fit: str = "crop"):
        super().__init__()
        self.slices = worker_shards(urls, rank, world_size, num_workers)
        self._urls = frozenset(urls)
        self.rank, self.num_workers, self.seed = rank, max(1, num_workers), seed
        self.batch_size, self.load_size, self.in_chans = batch_size, load_size, in_chans
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial
        self.max_bad_samples, self.skip_batches = max_bad_samples, skip_batches
        self.positives, self.pair_buffer = positives, pair_buffer
        self.volume, self.volume_fit = volume, volume_fit
        self.bad_samples: set[tuple[str, str]] = set()   # (shard, sample key or error) seen bad

    @property
    def bad(self) -> int:
        """Distinct unreadable samples met by this worker (each once, however many passes)."""
        return len(self.bad_samples)

    def _shard_cycle(self, worker: int) -> Iterator[dict[str, str]]:
        mine = self.slices[worker]
        for epoch in itertools.count():
            order = list(mine)
            random.Random(f"shards-{self.seed}-{epoch}-{self.rank}-{worker}").shuffle(order)
            for url in order:
                yield {"url": url}

    def _on_error(self, exn: Exception, sample: dict[str, Any] | None = None) -> bool:
        """Count a bad sample once, however many passes meet it; fail past the budget.

        ``sample``: the raw sample when decoding failed; for a tar-level error WebDataset
        appends the shard's url to ``exn.args`` and the error text stands for the key.
        """
        if sample is not None:
            where = (str(sample.get("__url__")), str(sample.get("__key__")))
        else:
            url = next((a for a in reversed(exn.args) if isinstance(a, str) and a in self._urls), "?")
            where = (url, f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}")
        if where in self.bad_samples:
            return True
        self.bad_samples.add(where)
        log.warning("skipping unreadable shard sample (%d so far): %s", self.bad, exn)
        if self.bad > self.max_bad_samples:
            raise MedsslError(f"data.shards: more than data.max_bad_samples={self.max_bad_samples} "
                              f"unreadable samples in one worker; last: {exn}; run `medssl shards verify`")
        return True

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        # The DataLoader asks its workers round-robin starting at 0, but after ``skip_batches``
        # the next batch belongs to logical worker ``skip_batches % num_workers``: rotate.
        worker = ((info.id if info is not None else 0) + self.skip_batches) % self.num_workers
        samples = wds.tarfile_samples(self._shard_cycle(worker), handler=self._on_error)
        rng = random.Random(f"samples-{self.seed}-{self.rank}-{worker}")
        samples = wds.filters._shuffle(iter(samples), self.shuffle_buffer, self.shuffle_initial, rng=rng)
        paired = self.positives != "same_image"
        if paired:   # pairs, not samples, are what a batch holds and what a resume skips
            samples = same_patient_pairs(samples, self.positives, self.pair_buffer)
        skip = batches_before(self.skip_batches, worker, self.num_workers) * self.batch_size
        samples = itertools.islice(samples, skip, None)
        batch: list[dict[str, Any]] = []
        for entry in samples:
            item = self._decode_pair(*entry) if paired else self._decode(entry)
            if item is None:
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """One raw sample -> tensors; None (counted) when it cannot be decoded."""
        try:
            item = load_sample(raw, self.load_size, self.volume_fit)
        except MedsslError:
            raise
        except Exception as exn:  # noqa: BLE001  a corrupt PNG or json: counted, bounded, never silent
            self._on_error(exn, raw)
            return None
        if item.pop("volume") != self.volume:   # a config mismatch, not a damaged sample
            kind = ("a 2-D image", "a volume model.arch (monai:<Net>)") if self.volume else \
                ("a volume", "a 2-D (timm) model.arch")
            raise MedsslError(f"{raw.get('__url__', 'shard')}: sample {raw.get('__key__')} is {kind[0]} "
                              f"but the run uses {kind[1]}; do not mix 2-D and volume shards")
        if item["image"].shape[0] != self.in_chans:
            raise MedsslError(f"{raw.get('__url__', 'shard')}: sample has {item['image'].shape[0]} "
                              f"channels but model.in_chans={self.in_chans}; set model.in_chans")
        return item

    def _decode_pair(self, first: dict[str, Any], second: dict[str, Any], group: int) -> dict[str, Any] | None:
        item = self._decode(first)
        other = item if second is first else self._decode(second)
        if item is None or other is None:
            return None
        item.update({PARTNER + k: other[k] for k in ("image", *_SCALARS)})
        item["group"], item["pair_cross"] = group, float(second is not first)
        return item


def build_loader(urls: list[str], *, rank: int, world_size: int, local_batch: int, seed: int,
                 data_cfg: Any, in_chans: int, skip_batches: int, pin_memory: bool,
                 volume: bool = False) -> DataLoader:
    """DataLoader over ``ShardStream`` (not passed through accelerate's ``prepare``);
    ``volume``: the run's arch is 3-D, so samples are volumes fitted to ``data.volume_size``."""
    stream = ShardStream(
        urls, rank=rank, world_size=world_size, num_workers=data_cfg.num_workers, seed=seed,
        batch_size=local_batch, load_size=data_cfg.volume_size if volume else data_cfg.load_size,
        in_chans=in_chans, shuffle_buffer=data_cfg.shuffle_buffer, shuffle_initial=data_cfg.shuffle_initial,
        max_bad_samples=data_cfg.max_bad_samples, skip_batches=skip_batches,
        positives=data_cfg.positives, pair_buffer=data_cfg.pair_buffer, volume=volume,
        volume_fit=data_cfg.volume_fit,
    )
    extra: dict[str, Any] = {}
    if data_cfg.num_workers > 0:
        extra = dict(prefetch_factor=data_cfg.prefetch_factor, persistent_workers=False)
    # Own generator: DataLoader draws worker base seeds from it, not from the global RNG the
    # trainer restores on resume.
    return DataLoader(stream, batch_size=None, num_workers=data_cfg.num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), **extra)


def summarize_intensity(urls: list[str], max_samples: int = 64) -> dict[str, Any]:
    """Most common modality, unit and default window among the first samples (for the run record).

    Only modality names and window numbers are read: nothing that identifies a patient.
    """
    from collections import Counter

    modalities: Counter[str] = Counter()
    windows: Counter[tuple[float, float]] = Counter()
    units: Counter[str] = Counter()
    samples = wds.tarfile_samples(({"url": u} for u in urls[:4]), handler=wds.warn_and_continue)
    for raw in itertools.islice(samples, max_samples):
        meta = json.loads(raw["json"])
        modalities[str(meta.get("modality"))] += 1
        units[str((meta.get("intensity") or {}).get("unit"))] += 1
        window = meta.get("window") or {}
        if window.get("center") is not None and window.get("width") is not None:
            windows[(float(window["center"]), float(window["width"]))] += 1
    window = windows.most_common(1)[0][0] if windows else None
    return {
        "modality": modalities.most_common(1)[0][0] if modalities else None,
        "unit": units.most_common(1)[0][0] if units else None,
        "window": {"center": window[0], "width": window[1]} if window else None,
    }


def estimated_epoch_steps(urls: list[str], global_batch: int) -> float:
    """Steps per pass over the data, from index.json sample counts when present (for logs)."""
    counts = 0
    for folder in {str(Path(u).parent) for u in urls}:
        index = Path(folder) / "index.json"
        if index.is_file():
            shards = json.loads(index.read_text()).get("shards", {})
            counts += sum(int(shards.get(Path(u).name, {}).get("samples", 0)) for u in urls
                          if str(Path(u).parent) == folder)
    return counts / global_batch if counts else math.nan
