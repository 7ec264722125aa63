"""Same-patient positives (MICLe): pairs share a patient, are cross-image where they can be,
resume exactly, and the patient's other images are masked out of the NT-Xent negatives."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from lightly.loss import NTXentLoss

from medssl.data.sample import encode_png
from pretrain.data import ShardStream
from pretrain.methods.ntxent import masked_ntxent
from pretrain.pairs import same_patient_pairs

SIZE = 8
# Images per patient in each shard: singletons, pairs and larger series, two studies each
# for the larger ones.
COUNTS = [1, 2, 3, 5, 1, 4, 2, 6]


def _write(out: Path, n_shards: int = 8, repeat: int = 5) -> dict[int, tuple[str, str]]:
    """Shards whose image ``i`` is filled with the value ``i``; returns i -> (patient, study)."""
    out.mkdir(parents=True)
    truth, i = {}, 1
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"train-{s:06d}.tar")) as sink:
            for p, count in enumerate(COUNTS * repeat):
                patient = f"pt-{s}-{p}"
                for k in range(count):
                    study = f"st-{k % 2}" if count >= 4 else "st-0"
                    meta = {"modality": "CT", "channels": 1, "patient": patient, "study": study,
                            "intensity": {"offset": 0.0, "slope": 1.0, "unit": None}, "window": None}
                    sink.write({"__key__": f"{s}-{p}-{k}", "img.png": encode_png(np.full((SIZE, SIZE), i, np.uint16)),
                                "json": json.dumps(meta).encode()})
                    truth[i] = (patient, study)
                    i += 1
    return truth


def _stream(shards: Path, positives: str, skip: int = 0, batch: int = 10, workers: int = 0) -> ShardStream:
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    return ShardStream(urls, rank=0, world_size=1, num_workers=workers, seed=3, batch_size=batch, load_size=SIZE,
                       in_chans=1, shuffle_buffer=20, shuffle_initial=10, max_bad_samples=0, skip_batches=skip,
                       positives=positives, pair_buffer=256)


def _ids(images: torch.Tensor) -> list[int]:
    return [int(v) for v in images[:, 0, 0, 0]]


@pytest.mark.parametrize("positives, level", [("same_patient", 0), ("same_study", 1)])
def test_a_thousand_pairs_share_a_patient_and_are_cross_image_where_possible(tmp_path: Path, positives, level):
    # 960 images, so 1,000 pairs are about two passes: an image never meets its own repeat
    # (the pairing would then have to self-pair it, see pretrain/pairs.py).
    truth = _write(tmp_path / "shards")
    key = {i: truth[i][: level + 1] for i in truth}
    sizes = {k: sum(1 for i in key if key[i] == k) for k in set(key.values())}
    pairs, groups = [], {}
    for batch in itertools.islice(iter(_stream(tmp_path / "shards", positives)), 100):
        for a, b, g, cross in zip(_ids(batch["image"]), _ids(batch["partner_image"]), batch["group"].tolist(),
                                  batch["pair_cross"].tolist()):
            pairs.append((a, b))
            assert key[a] == key[b], (a, b)
            assert cross == float(a != b)
            assert groups.setdefault(key[a], g) == g        # one group id per patient (study)
    assert len(pairs) == 1000 and len(set(groups.values())) == len(groups)
    for a, b in pairs:
        # Every key with two or more images pairs two different ones, every time.
        assert (a != b) == (sizes[key[a]] >= 2), (a, b, sizes[key[a]])


def test_pair_stream_resumes_exactly(tmp_path: Path):
    _write(tmp_path / "shards")
    full = list(itertools.islice(iter(_stream(tmp_path / "shards", "same_patient")), 30))
    resumed = list(itertools.islice(iter(_stream(tmp_path / "shards", "same_patient", skip=17)), 13))
    for a, b in zip(full[17:], resumed):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) or torch.allclose(a[k], b[k], equal_nan=True, rtol=0, atol=0), k


def test_same_image_stream_has_no_pairs(tmp_path: Path):
    _write(tmp_path / "shards")
    batch = next(iter(_stream(tmp_path / "shards", "same_image")))
    assert set(batch) == {"image", "offset", "slope", "center", "width"}


def test_a_full_buffer_self_pairs_the_oldest_unpaired_image():
    raws = [{"json": json.dumps({"patient": p}).encode(), "__key__": str(i)} for i, p in enumerate("abcab")]

    def pairs(buffer: int) -> list[tuple[str, str]]:
        return [(x["__key__"], y["__key__"]) for x, y, _ in same_patient_pairs(iter(raws), "same_patient", buffer)]

    # Room for three patients: both a and b find their second image; c, alone, pairs with itself.
    assert pairs(3) == [("0", "3"), ("1", "4"), ("2", "2")]
    # Room for two: each image leaves before its patient's next one comes; none is left out.
    assert pairs(2) == [("0", "0"), ("1", "1"), ("2", "2"), ("3", "3"), ("4", "4")]


def _reference(z0: torch.Tensor, z1: torch.Tensor, groups: list[int], t: float) -> torch.Tensor:
    """NT-Xent written out per anchor: negatives are every view of every other group."""
    z = torch.nn.functional.normalize(torch.cat([z0, z1]), dim=1)
    n, losses = z0.shape[0], []
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        keep = [c for c in range(2 * n) if c == pos or groups[c % n] != groups[a % n]]
        logits = torch.stack([z[a] @ z[c] / t for c in keep])
        losses.append(-(logits[keep.index(pos)] - torch.logsumexp(logits, 0)))
    return torch.stack(losses).mean()


def test_masked_ntxent_masks_same_patient_negatives_and_equals_lightly_otherwise():
    torch.manual_seed(0)
    z0, z1 = torch.randn(8, 6), torch.randn(8, 6)
    distinct = torch.arange(8)
    torch.testing.assert_close(masked_ntxent(z0, z1, distinct, 0.2), NTXentLoss(temperature=0.2)(z0, z1))
    groups = [0, 0, 1, 2, 2, 2, 3, 4]
    ours = masked_ntxent(z0, z1, torch.tensor(groups), 0.2)
    torch.testing.assert_close(ours, _reference(z0, z1, groups, 0.2))
    assert not torch.allclose(ours, NTXentLoss(temperature=0.2)(z0, z1))
    # Moving sample 1 towards sample 0 changes nothing for anchor 0 here: 1 is its patient's.
    z0b = z0.clone()
    z0b[1] = z0[0] * 5
    z1b = z1.clone()
    z1b[1] = z0[0] * 5
    def anchor0(a, b):
        z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
        keep = [8] + [c for c in range(16) if groups[c % 8] != 0]
        logits = z[0] @ z[keep].T / 0.2
        return -(logits[0] - torch.logsumexp(logits, 0))
    assert torch.equal(anchor0(z0, z1), anchor0(z0b, z1b))


def test_debug_run_with_same_patient_pairs_logs_the_cross_image_rate(shard_dir: Path, tmp_path: Path):
    from medssl.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.resolve import resolve_method_defaults
    from pretrain.trainer import train

    cfg = resolve_method_defaults(load_config(PretrainConfig, Path(__file__).resolve().parents[2] / "configs" / "debug.yaml",
                                              [f"data.shards={shard_dir}", f"output_dir={tmp_path}",
                                               "data.positives=same_patient"]))
    assert train(cfg) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # conftest's shards hold 16 images per patient: every pair is two different images.
    assert len(rows) == 6 and all(r["cross_image_pairs"] == 1.0 for r in rows)
