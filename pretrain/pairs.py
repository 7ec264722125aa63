"""Same-patient positive pairs (``data.positives``), formed in the raw shard stream.

MICLe (Azizi et al. 2021) takes the two views of a positive pair from two different images
of one patient; MedAug restricts them to one study. Pairs are formed here, on raw (undecoded)
samples, after the seeded shuffle and before the resume skip (pretrain/data.py), so the pair
stream is a pure function of the seed like the sample stream, and a resumed run skips whole
pairs and sees exactly the pairs the uninterrupted run would have.

A bounded buffer holds, per patient (or per patient and study), the latest image seen. When
another image of that key arrives, the two are emitted as a pair and the new one stays as the
key's latest: a patient with n images in one reader's stream gives n - 1 cross-image pairs and
each of its images is used. When the buffer is full, the oldest waiting image leaves; if it was
never paired, it is emitted paired with itself (two views of one image, as SimCLR), so no
image is dropped. Samples without the key (no pseudonym) are self-pairs at once.

Per-rank disjointness is by shard (pretrain/data.py), and ``medssl shard`` writes a patient's
images together into one shard, so a patient's images meet in one reader; a patient split
across shards of different readers yields cross-image pairs only within each reader's part.
Only the pseudonyms already in the shard json are read; they leave this module only as a
63-bit hash (``group_id``) in the batch, used to mask same-patient negatives, never logged or saved.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

Raw = dict[str, Any]
#: Batch keys of a pair's second image (``partner_image``, ``partner_offset``...): written by
#: pretrain/data.py, read by pretrain/augment.py's ``view_source``.
PARTNER = "partner_"


def pair_key(raw: Raw, positives: str) -> str | None:
    """The key images are paired by: the patient pseudonym, or patient and study; None if absent."""
    try:
        meta = json.loads(raw["json"])
    except (KeyError, ValueError, TypeError):
        return None   # the decoder reports the sample; it stays a self-pair here
    patient = meta.get("patient")
    if not patient:
        return None
    if positives == "same_study":
        study = meta.get("study")
        return f"{patient}\x00{study}" if study else None
    return str(patient)


def group_id(key: str | None, raw: Raw) -> int:
    """A stable int63 per key (patient), for the loss to mask; a sample without one gets its own."""
    text = key if key is not None else f"\x01{raw.get('__url__')}\x00{raw.get('__key__')}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def _same_image(a: Raw, b: Raw) -> bool:
    return (a.get("__url__"), a.get("__key__")) == (b.get("__url__"), b.get("__key__"))


def same_patient_pairs(samples: Iterator[Raw], positives: str, buffer: int) -> Iterator[tuple[Raw, Raw, int]]:
    """``(first, second, group)`` per pair; ``first is second`` for a self-pair."""
    waiting: OrderedDict[str, tuple[Raw, bool]] = OrderedDict()   # key -> (latest image, paired yet)
    for raw in samples:
        key = pair_key(raw, positives)
        if key is None:
            yield raw, raw, group_id(None, raw)
            continue
        if key in waiting and _same_image(waiting[key][0], raw):
            # The stream came round to this image again (a small corpus, a large buffer):
            # it is no partner of itself.
            old, paired = waiting.pop(key)
            if not paired:
                yield old, old, group_id(key, old)
            waiting[key] = (raw, False)
        elif key in waiting:
            other, _ = waiting.pop(key)
            yield other, raw, group_id(key, raw)
            waiting[key] = (raw, True)
        else:
            waiting[key] = (raw, False)
        while len(waiting) > buffer:
            old_key, (old, paired) = waiting.popitem(last=False)
            if not paired:
                yield old, old, group_id(old_key, old)
    for old_key, (old, paired) in waiting.items():   # only reached by a finite stream (tests)
        if not paired:
            yield old, old, group_id(old_key, old)
