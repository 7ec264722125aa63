"""Near-duplicate images across two shard folders (pretraining vs a task), by sample key.

``hash_folder`` streams a folder once (``shards.iter_samples``), keeping per sample only its
pseudonymous key, patient pseudonym, split, packed hash and, optionally, an embedding.
``find_leaks`` indexes the pretraining set (the large one) and asks it for every task image
within ``radius`` bits; with an encoder it also pairs images whose embedding cosine reaches
``min_cosine``. Paths never enter a result: shard folders are named "pretrain" and "task".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from medssl.data.shards import iter_samples, list_shards, read_index
from medssl.errors import MedsslError
from medssl.leakage.index import HammingIndex
from medssl.leakage.phash import DEFAULT_BITS, hamming, is_blank, phash, unit_view

log = logging.getLogger(__name__)

#: Hamming radius (of 256 bits) at or below which two images are reported as one. Chosen by
#: `python benchmarks/leakage.py` on its calibration corpus (seed 1, 5,200 x 800 images): the
#: smallest radius with recall >= 0.97 on 200 copies carrying all five transforms (38 reached
#: 0.96 there but only 0.92 on the held-out copies). MEASURED holds the held-out figures.
DEFAULT_RADIUS = 42
#: Figures of DEFAULT_RADIUS on the held-out benchmark corpus (seed 2: 5,050 pretraining images
#: with 50 transformed copies of task images, 800 task images), quoted in every report.
MEASURED = {"benchmark": "benchmarks/leakage.py (synthetic chest CT, held-out corpus)",
            "radius": 42, "bits": 256, "copies": 50, "recall": 0.96,
            "recall_ci": [0.865, 0.989], "fp_rate_pairs": 0.00608,
            "clean_task_images_flagged": 0.854}
#: Pairs listed per task image in a report; the count within the radius is always complete.
MAX_LISTED = 10

Encoder = Callable[[np.ndarray], np.ndarray]
"""Maps float32 ``[B, 1, S, S]`` windowed views in [0, 1] to ``[B, D]`` embeddings."""


@dataclass
class HashedSet:
    """What ``find_leaks`` keeps of one shard folder: one row per sample."""

    keys: list[str]
    patients: list[str | None]
    splits: list[str]
    hashes: np.ndarray                 # [N, bits // 8] uint8
    blank: np.ndarray                  # [N] bool: flat in its window, never paired
    embeddings: np.ndarray | None = None   # [N, D] float32, L2-normalised

    def __len__(self) -> int:
        return len(self.keys)


def hash_folder(folder: Path | str, bits: int = DEFAULT_BITS, splits: list[str] | None = None,
                encoder: Encoder | None = None, embed_size: int = 64, batch_size: int = 256,
                desc: str = "hash") -> HashedSet:
    """Hash every sample of a shard folder (all splits, or only ``splits``).

    Volume folders are refused: the perceptual hash is of one 2-D view, and no 3-D hash is
    calibrated (benchmarks/leakage.py measures slices). A 3-D benchmark still gets the
    patient-level guard (finetune/leakage_guard.py), which needs no image comparison.
    """
    index = read_index(folder)
    if (index.get("config") or {}).get("volumes"):
        raise MedsslError(f"{folder}: volume shards; the near-duplicate image check is 2-D only "
                          "(the pretraining-patient check still runs): drop leakage_check for 3-D")
    present = sorted({info.get("split") for info in index["shards"].values()})
    wanted = present if splits is None else list(splits)
    missing = [s for s in wanted if s not in present]
    if missing:
        raise MedsslError(f"{folder}: no shards for split(s) {missing} (splits present: {present})")
    keys, patients, split_of, hashes, blank, embeds = [], [], [], [], [], []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            out = np.asarray(encoder(np.stack(pending)[:, None]), dtype=np.float32)
            if out.ndim != 2 or len(out) != len(pending):
                raise MedsslError(f"leakage encoder returned shape {out.shape} for "
                                  f"{len(pending)} images; expected [B, D]")
            embeds.append(out)
            pending.clear()

    total = sum(int(index.get("splits", {}).get(s, {}).get("samples", 0)) for s in wanted) or None
    bar = tqdm(total=total, unit="img", desc=desc, disable=None)
    for split in wanted:
        for sample in iter_samples(list_shards(folder, split)):
            view = unit_view(sample)
            keys.append(sample.key)
            patients.append(sample.patient)
            split_of.append(split)
            flat = is_blank(view)
            blank.append(flat)
            hashes.append(phash(view, bits) if not flat else np.zeros(bits // 8, np.uint8))
            if encoder is not None:
                pending.append(_resize(view, embed_size))
                if len(pending) >= batch_size:
                    flush()
            bar.update(1)
    bar.close()
    if encoder is not None:
        flush()
    embeddings = None
    if encoder is not None and embeds:
        embeddings = np.concatenate(embeds)
        embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    return HashedSet(keys, patients, split_of,
                     np.stack(hashes) if hashes else np.zeros((0, bits // 8), np.uint8),
                     np.asarray(blank, bool), embeddings)


def _resize(view: np.ndarray, size: int) -> np.ndarray:
    pil = Image.fromarray(np.ascontiguousarray(view, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


@dataclass
class LeakPair:
    """One cross-set pair: a task image and a pretraining image that look like one image."""

    task_key: str
    task_split: str
    pretrain_key: str
    hamming: int
    cosine: float | None = None
    task_patient: str | None = None
    pretrain_patient: str | None = None


@dataclass
class LeakageResult:
    """Everything a leakage report says; sample keys and pseudonyms only, never a path."""

    bits: int
    radius: int
    min_cosine: float | None
    pretrain_samples: int
    task_samples: dict[str, int]            # per split
    blank: dict[str, int]                   # {"pretrain": n, "task": n}: never paired
    matched: dict[str, int]                 # task images with >= 1 pair, per split
    pairs_total: int                        # every pair found (listed or not)
    pairs: list[LeakPair] = field(default_factory=list)   # the listed ones, closest first
    measured: dict = field(default_factory=lambda: dict(MEASURED))

    @property
    def leaked(self) -> bool:
        return self.pairs_total > 0


def find_pairs(pretrain: HashedSet, task: HashedSet, radius: int = DEFAULT_RADIUS,
               min_cosine: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                        np.ndarray | None]:
    """All cross pairs ``(task_rows, pretrain_rows, hamming, cosine-or-None)``; blanks never pair.

    A pair is kept when its Hamming distance is <= ``radius``, or (with embeddings on both
    sides and ``min_cosine`` given) when its embedding cosine is >= ``min_cosine``.
    """
    if pretrain.hashes.shape[1] != task.hashes.shape[1]:
        raise MedsslError("pretrain and task hashes differ in length")
    p_ok, t_ok = np.flatnonzero(~pretrain.blank), np.flatnonzero(~task.blank)
    q, i, _ = HammingIndex(pretrain.hashes[p_ok]).within(task.hashes[t_ok], radius)
    rows = [(t_ok[q], p_ok[i])]
    use_cos = (min_cosine is not None and pretrain.embeddings is not None
               and task.embeddings is not None)
    if use_cos:
        import faiss  # only with an encoder

        ip = faiss.IndexFlatIP(pretrain.embeddings.shape[1])
        ip.add(np.ascontiguousarray(pretrain.embeddings[p_ok]))
        lims, _, idx = ip.range_search(np.ascontiguousarray(task.embeddings[t_ok]),
                                       float(min_cosine) - 1e-6)
        counts = np.diff(lims.astype(np.int64))
        rows.append((t_ok[np.repeat(np.arange(len(t_ok)), counts)], p_ok[idx.astype(np.int64)]))
    t_rows = np.concatenate([r[0] for r in rows]).astype(np.int64)
    p_rows = np.concatenate([r[1] for r in rows]).astype(np.int64)
    if len(rows) > 1 and len(t_rows):
        uniq = np.unique(np.stack([t_rows, p_rows], 1), axis=0)
        t_rows, p_rows = uniq[:, 0], uniq[:, 1]
    dist = hamming(task.hashes[t_rows], pretrain.hashes[p_rows]).astype(np.int64)
    cos = (np.einsum("nd,nd->n", task.embeddings[t_rows], pretrain.embeddings[p_rows])
           if use_cos else None)
    order = np.lexsort((p_rows, dist, t_rows))
    return t_rows[order], p_rows[order], dist[order], None if cos is None else cos[order]


def find_leaks(pretrain_dir: Path | str, task_dir: Path | str, radius: int = DEFAULT_RADIUS,
               bits: int = DEFAULT_BITS, task_splits: list[str] | None = None,
               encoder: Encoder | None = None, min_cosine: float | None = None,
               max_listed: int = MAX_LISTED,
               pretrain_splits: list[str] | None = None) -> LeakageResult:
    """Cross-set near-duplicates between two shard folders; see the module docstring.

    ``task_splits`` / ``pretrain_splits``: the splits compared (None: all of the folder's).
    """
    if not 0 <= radius < bits:
        raise MedsslError(f"leakage radius {radius} must lie in [0, {bits})")
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise MedsslError(f"leakage min_cosine {min_cosine} must lie in [-1, 1]")
    if (encoder is None) != (min_cosine is None):
        raise MedsslError("leakage: an encoder needs min_cosine, and min_cosine an encoder")
    read_index(pretrain_dir), read_index(task_dir)  # both folders checked before any work
    pre = hash_folder(pretrain_dir, bits, splits=pretrain_splits, encoder=encoder,
                      desc="hash pretrain")
    task = hash_folder(task_dir, bits, splits=task_splits, encoder=encoder, desc="hash task")
    return compare(pre, task, radius, min_cosine, max_listed)


def compare(pre: HashedSet, task: HashedSet, radius: int = DEFAULT_RADIUS,
            min_cosine: float | None = None, max_listed: int = MAX_LISTED) -> LeakageResult:
    """``find_leaks`` on sets already hashed (benchmarks hash once, compare at many radii)."""
    t_rows, p_rows, dist, cos = find_pairs(pre, task, radius, min_cosine)
    listed, seen = [], {}
    for n, (t, p, d) in enumerate(zip(t_rows, p_rows, dist)):
        seen[t] = seen.get(t, 0) + 1
        if seen[t] <= max_listed:
            listed.append(LeakPair(task.keys[t], task.splits[t], pre.keys[p], int(d),
                                   None if cos is None else round(float(cos[n]), 4),
                                   task.patients[t], pre.patients[p]))
    listed.sort(key=lambda pair: (pair.hamming, pair.task_key, pair.pretrain_key))
    splits = sorted(set(task.splits))
    matched = {s: 0 for s in splits}
    for t in seen:
        matched[task.splits[t]] += 1
    return LeakageResult(
        bits=pre.hashes.shape[1] * 8, radius=int(radius), min_cosine=min_cosine,
        pretrain_samples=len(pre),
        task_samples={s: task.splits.count(s) for s in splits},
        blank={"pretrain": int(pre.blank.sum()), "task": int(task.blank.sum())},
        matched=matched, pairs_total=len(t_rows), pairs=listed)
