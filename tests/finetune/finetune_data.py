"""Synthetic data for the finetune tests (imported by the test files): MedMNIST npz files in
the official layout and sizes, tiny labeled shard folders in the medssl shard format, and
published dirs holding random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medssl.data.sample import encode_intensity, encode_png

BREAST_SIZES = {"train": 546, "val": 78, "test": 156}
ARCH = "test_efficientnet"


def synthetic_images(labels: np.ndarray, size: int, rng: np.random.Generator, signal: bool,
                     amplitude: float = 30.0,
                     channels: int = 1) -> np.ndarray:
    """uint8 ``[N, size, size]`` (or ``[..., 3]``): noise plus, when ``signal``, a bright square
    whose position encodes the class (first positive label for multi-label)."""
    n = len(labels)
    imgs = rng.normal(100, 25, size=(n, size, size)).clip(0, 255)
    if signal:
        y = labels.reshape(n, -1)
        for i in range(n):
            if y.shape[1] == 1:
                c = int(y[i, 0])
                positions = [c]
            else:
                positions = list(np.flatnonzero(y[i]))
            for c in positions:
                r0 = (c * 7) % (size - 8)
                c0 = (c * 11) % (size - 8)
                imgs[i, r0:r0 + 8, c0:c0 + 8] += amplitude
    imgs = imgs.clip(0, 255).astype(np.uint8)
    if channels == 3:
        imgs = np.repeat(imgs[..., None], 3, axis=-1)
    return imgs


def write_medmnist_npz(root: Path, flag: str = "breastmnist", signal: bool = True, seed: int = 0,
                       sizes: dict[str, int] | None = None, n_classes: int = 2,
                       multilabel: bool = False, channels: int = 1) -> Path:
    """``{flag}.npz`` with keys ``{split}_images`` uint8 and ``{split}_labels`` ``[N, 1]``
    (``[N, L]`` multi-label), exactly as medmnist's files are laid out."""
    import medmnist

    info = medmnist.INFO[flag]
    sizes = sizes or info["n_samples"]
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        if multilabel:
            labels = (rng.random((n, n_classes)) < 0.3).astype(np.uint8)
        else:
            labels = (np.arange(n) % n_classes).astype(np.uint8)[:, None]
            rng.shuffle(labels)
        arrays[f"{split}_images"] = synthetic_images(labels, 28, rng, signal, channels=channels)
        arrays[f"{split}_labels"] = labels
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{flag}.npz"
    np.savez_compressed(path, **arrays)
    return path


def planted_attributes(p: int, n_sites: int = 2) -> tuple[dict[str, str], str]:
    """``(attributes, view)`` of patient ``p``: site ``H{(p // 10) % n_sites + 1}``, sex ``F`` for
    ``(p // 20)`` even else ``M``, age band ``40-59`` / ``60-79`` by ``(p // 40)``, and view ``LAT``
    for ``p % 20 == 4`` (binary labels ``p % 2``: LAT patients are all class 0, and all in test),
    else ``PA``. With the patient split of ``write_labeled_shards`` (``p % 5``) every site, sex and
    age band holds both binary classes in every split."""
    attributes = {"site": f"H{(p // 10) % n_sites + 1}", "sex": "F" if (p // 20) % 2 == 0 else "M",
                  "age": "40-59" if (p // 40) % 2 == 0 else "60-79"}
    return attributes, "LAT" if p % 20 == 4 else "PA"


def write_labeled_shards(out: Path, kind: str = "multiclass", n_classes: int = 3, signal: bool = True,
                         patients: int = 30, per_patient: int = 4, size: int = 32, seed: int = 0,
                         attributes: bool = False, n_sites: int = 2, signal_sites: set[str] | None = None,
                         amplitude: float = 30.0) -> Path:
    """A shard folder (``{split}-000000.tar`` + index.json) of 16-bit CT-like slices in HU,
    split by patient 60/20/20, labelled per patient.

    ``attributes``: each sample's json records ``planted_attributes`` (``attributes`` dict with
    sex, age band, site; ``view`` as the contract's top-level field). ``signal_sites``: only
    patients at these sites carry the label signal; the others' images are noise, so their
    labels cannot be predicted."""
    import webdataset as wds

    from medssl.io import sha256_file

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    split_of = {p: ("train" if p % 5 < 3 else "val" if p % 5 == 3 else "test") for p in range(patients)}
    writers, counts, pats = {}, {}, {}
    for split in ("train", "val", "test"):
        writers[split] = wds.TarWriter(str(out / f"{split}-000000.tar"))
        counts[split] = 0
        pats[split] = set()
    for p in range(patients):
        if kind == "multilabel":
            label = (rng.random(n_classes) < 0.4).astype(int)
            label[p % n_classes] = 1
            label_arr = label[None]
        else:
            label = p % (2 if kind == "binary" else n_classes)
            label_arr = np.array([[label]])
        attrs, view = planted_attributes(p, n_sites)
        carries = signal and (signal_sites is None or attrs["site"] in signal_sites)
        imgs = synthetic_images(np.repeat(label_arr, per_patient, axis=0), size, rng, carries, amplitude)
        for k, img in enumerate(imgs):
            hu = img.astype(np.int32) * 4 - 400  # 0..255 -> -400..620 HU
            stored, offset, slope = encode_intensity(hu)
            meta = {"modality": "CT", "patient": f"p-{p:016x}", "channels": 1,
                    "intensity": {"offset": offset, "slope": slope, "unit": "HU"},
                    "window": {"center": 110.0, "width": 1020.0},
                    "label": label.tolist() if kind == "multilabel" else int(label)}
            if attributes:
                meta.update(attributes=attrs, view=view)
            split = split_of[p]
            sample = {"__key__": f"p{p:03d}-{k:04d}", "img.png": encode_png(stored),
                      "json": json.dumps(meta).encode()}
            if kind != "multilabel":
                sample["cls"] = str(int(label)).encode()
            writers[split].write(sample)
            counts[split] += 1
            pats[split].add(p)
    for w in writers.values():
        w.close()
    names = [f"c{i}" for i in range(2 if kind == "binary" else n_classes)]
    index = {
        "format": "medssl-shards/1", "medssl_version": "0.1.0", "created": "2026",
        "shards": {f"{s}-000000.tar": {"split": s, "samples": counts[s],
                                        "sha256": sha256_file(out / f"{s}-000000.tar")}
                   for s in counts},
        "splits": {s: {"samples": counts[s], "patients": len(pats[s])} for s in counts},
        "labels": {"type": kind, "names": names},
    }
    (out / "index.json").write_text(json.dumps(index))
    return out


def write_published(folder, in_chans=1, window=(40.0, 400.0)):
    """A dir in `medssl publish`'s layout holding random weights (enough to test loading)."""
    import timm
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0, in_chans=in_chans)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    from medssl.published import hub_config, write_sums

    config = hub_config(model, ARCH, in_chans, 32, [0.5] * in_chans, [0.25] * in_chans, "other", {},
                        "simclr", {"window": {"center": window[0], "width": window[1]}})
    (folder / "config.json").write_text(json.dumps(config))
    write_sums(folder, ["config.json", "model.safetensors"])
    return folder, model


def set_salt(folder: Path, salt_id: str) -> str:
    """Record ``salt_id`` in a shard folder's index.json (as `medssl shard` does); returns the
    folder's new index digest."""
    import hashlib

    index = json.loads((folder / "index.json").read_text())
    index.setdefault("config", {})["salt_id"] = salt_id
    (folder / "index.json").write_text(json.dumps(index))
    return hashlib.sha256((folder / "index.json").read_bytes()).hexdigest()


def write_patient_shards(out: Path, patients: dict[str, int], salt_id: str, split: str = "train",
                         size: int = 16, seed: int = 0) -> Path:
    """An unlabeled shard folder of one split: ``patients`` maps pseudonym -> images."""
    import webdataset as wds

    from medssl.io import sha256_file

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    name = f"{split}-000000.tar"
    n = 0
    with wds.TarWriter(str(out / name)) as tw:
        for patient, count in patients.items():
            for k in range(count):
                stored, offset, slope = encode_intensity(rng.integers(-400, 600, (size, size)))
                meta = {"modality": "CT", "patient": patient, "channels": 1,
                        "intensity": {"offset": offset, "slope": slope, "unit": "HU"}}
                tw.write({"__key__": f"{patient}-{k:04d}", "img.png": encode_png(stored),
                          "json": json.dumps(meta).encode()})
                n += 1
    index = {"format": "medssl-shards/1", "medssl_version": "0.1.0", "created": "2026",
             "shards": {name: {"split": split, "samples": n, "sha256": sha256_file(out / name)}},
             "splits": {split: {"samples": n, "patients": len(patients)}},
             "config": {"salt_id": salt_id}}
    (out / "index.json").write_text(json.dumps(index))
    return out


def write_ssl_published(folder: Path, pretraining_data: list[dict], patient_hashes=None,
                        in_chans: int = 1) -> Path:
    """A published dir of random weights whose config.json records what pretraining read
    (``pretraining_data`` entries: split, index_sha256, salt_id, shards, samples) and, when
    given, a ``PatientHashes`` sidecar listed in SHA256SUMS, as `medssl publish` writes them."""
    import timm
    import torch
    from safetensors.torch import save_file

    from medssl.leakage.patients import FILE_NAME, write_hashes
    from medssl.published import hub_config, write_sums

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0, in_chans=in_chans)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    config = hub_config(model, ARCH, in_chans, 32, [0.5] * in_chans, [0.25] * in_chans, "other", {},
                        "simclr", {"window": {"center": 110.0, "width": 1020.0},
                                   "pretraining_data": pretraining_data})
    (folder / "config.json").write_text(json.dumps(config))
    names = ["config.json", "model.safetensors"]
    if patient_hashes is not None:
        write_hashes(folder / FILE_NAME, patient_hashes)
        names.append(FILE_NAME)
    write_sums(folder, names)
    return folder
