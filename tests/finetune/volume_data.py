"""Synthetic 3-D data for the finetune tests: 3-D MedMNIST npz files of the official shapes and
split sizes, tiny labeled volume shard folders in the medssl format (encode_volume + TarWriter
+ index.json), and 3-D published dirs of random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY_RESNET = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 16, 32]}
TINY_SWIN = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}


def synthetic_volumes(labels: np.ndarray, size: int, rng: np.random.Generator,
                      amplitude: float = 60.0) -> np.ndarray:
    """uint8 ``[N, size, size, size]``: noise plus a bright cube whose corner encodes the class."""
    n = len(labels)
    vols = rng.normal(90, 20, size=(n, size, size, size)).astype(np.float32)
    side = max(4, size // 4)
    for i in range(n):
        c = int(labels[i, 0])
        x0, y0, z0 = ((c * 5) % (size - side), (c * 9) % (size - side), (c * 3) % (size - side))
        vols[i, x0:x0 + side, y0:y0 + side, z0:z0 + side] += amplitude
    return vols.clip(0, 255).astype(np.uint8)


def write_medmnist3d_npz(root: Path, flag: str = "fracturemnist3d", size: int = 28, seed: int = 0,
                         sizes: dict[str, int] | None = None) -> Path:
    """``{flag}.npz`` / ``{flag}_64.npz`` exactly as medmnist lays them out: ``{split}_images``
    uint8 ``[N, S, S, S]`` and ``{split}_labels`` ``[N, 1]``, with the official split sizes."""
    import medmnist

    info = medmnist.INFO[flag]
    n_classes = len(info["label"])
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (sizes or info["n_samples"]).items():
        labels = (np.arange(n) % n_classes).astype(np.uint8)[:, None]
        rng.shuffle(labels)
        arrays[f"{split}_images"] = synthetic_volumes(labels, size, rng)
        arrays[f"{split}_labels"] = labels
    root.mkdir(parents=True, exist_ok=True)
    path = root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    np.savez(path, **arrays)
    return path


def write_volume_shards(out: Path, patients: int = 20, per_patient: int = 2, size: int = 20,
                        n_classes: int = 2, seed: int = 0) -> Path:
    """A labeled volume shard folder: CT-like uint16 ``vol.npy.gz`` in HU (offset -1024), split
    by patient 60/20/20, per-patient label in json and cls, spacing in the json."""
    import webdataset as wds

    from medssl.data.sample import VOLUME_MEMBER, encode_intensity, encode_volume
    from medssl.io import sha256_file

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    split_of = {p: ("train" if p % 5 < 3 else "val" if p % 5 == 3 else "test") for p in range(patients)}
    # encoder=False, as medssl's own writer: the default encoder gzips bytes named *.gz again.
    writers = {s: wds.TarWriter(str(out / f"{s}-000000.tar"), encoder=False) for s in ("train", "val", "test")}
    counts = {s: 0 for s in writers}
    pats: dict[str, set] = {s: set() for s in writers}
    for p in range(patients):
        label = p % n_classes
        vols = synthetic_volumes(np.full((per_patient, 1), label), size, rng)
        for k, vol in enumerate(vols):
            hu = vol.astype(np.int32) * 4 - 400           # 0..255 -> -400..620 HU
            stored, offset, slope = encode_intensity(hu)
            meta = {"modality": "CT", "patient": f"p-{p:016x}", "channels": 1,
                    "intensity": {"offset": offset, "slope": slope, "unit": "HU"},
                    "window": {"center": 110.0, "width": 1020.0}, "spacing": [1.5, 1.5, 2.0],
                    "label": int(label)}
            split = split_of[p]
            writers[split].write({"__key__": f"p{p:03d}-{k:04d}", VOLUME_MEMBER: encode_volume(stored),
                                  "json": json.dumps(meta).encode(), "cls": str(label).encode()})
            counts[split] += 1
            pats[split].add(p)
    for w in writers.values():
        w.close()
    index = {
        "format": "medssl-shards/1", "medssl_version": "0.1.0", "created": "2026",
        "shards": {f"{s}-000000.tar": {"split": s, "samples": counts[s],
                                        "sha256": sha256_file(out / f"{s}-000000.tar")} for s in counts},
        "splits": {s: {"samples": counts[s], "patients": len(pats[s])} for s in counts},
        "labels": {"type": "binary" if n_classes == 2 else "multiclass",
                   "names": [f"c{i}" for i in range(n_classes)]},
        "config": {"volumes": True, "spacing": [1.5, 1.5, 2.0]},
    }
    (out / "index.json").write_text(json.dumps(index))
    return out


def write_volume_published(folder: Path, kwargs=None, cube: int = 16, seed: int = 3,
                           pretraining_data: list[dict] | None = None):
    """A 3-D published dir (monai:ResNet) of random weights, as `medssl publish` writes it;
    ``pretraining_data``: what its config.json says pretraining read."""
    import torch
    from safetensors.torch import save_file

    from medssl.published import volume_config, write_sums
    from medssl.volume_models import create_volume_backbone

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    backbone = create_volume_backbone("monai:ResNet", 1, kwargs or TINY_RESNET)
    save_file({k: v.contiguous() for k, v in backbone.net_state_dict().items()}, folder / "model.safetensors")
    config = volume_config("monai:ResNet", "ResNet", backbone.net_kwargs, backbone.num_features, 1,
                           (cube,) * 3, [0.5], [0.25], "other", "simclr", [1.5, 1.5, 2.0],
                           {"window": {"center": 40.0, "width": 400.0}, "steps": 5,
                            "pretraining_data": pretraining_data or []})
    (folder / "config.json").write_text(json.dumps(config))
    write_sums(folder, ["config.json", "model.safetensors"])
    return folder, backbone


def write_monai_ssl_file(path: Path, kwargs=None) -> None:
    """A file in the layout of MONAI's released ``model_swinvit.pt`` (``module.`` encoder keys,
    ``mlp.fc1``/``fc2`` names, an SSL head) from a random Swin UNETR (tests/test_models_volumes.py
    checks that layout against MONAI's own ``load_from``)."""
    import torch
    from monai.networks.nets import SwinUNETR

    kwargs = kwargs or TINY_SWIN
    torch.manual_seed(5)
    source = SwinUNETR(in_channels=1, out_channels=1, spatial_dims=3, **kwargs)
    state = {"module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
             for k, v in source.swinViT.state_dict().items()}
    state["module.rotation_head.weight"] = torch.randn(4, 16 * kwargs["feature_size"])
    torch.save({"state_dict": state}, path)
