"""Tiny synthetic shards in the real format, written with webdataset's TarWriter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from medssl.data.sample import VOLUME_MEMBER, encode_intensity, encode_png, encode_volume

# Two cores shared by many test runs: more threads than cores makes every step several
# times slower and timing-dependent. Subprocesses get OMP_NUM_THREADS=1 (see run_cli).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"

#: MAE at debug size: a two-block ViT with 8 px patches and a one-block decoder.
TINY_MAE = ["method.name=mae", "model.arch=vit_tiny_patch16_224", "model.kwargs={patch_size: 8, depth: 2}",
            "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=4", "train.lr=0.002"]

#: DINO at debug size: a small head, two 16 px local crops beside the two 32 px global ones.
TINY_DINO = ["method.name=dino", "method.head_hidden_dim=64", "method.head_bottleneck_dim=32",
             "method.head_output_dim=128", "augment.local_crops=2", "augment.local_crop_size=16",
             "train.lr=0.005"]


def synthetic_ct(rng: np.random.Generator, size: int) -> np.ndarray:
    """``[size, size]`` int16 HU: air, a body ellipse of soft tissue, a few bright blobs."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    img = np.full((size, size), -1000.0)
    a, b = rng.uniform(0.3, 0.45, 2)
    body = (xx / a) ** 2 + (yy / b) ** 2 < 1
    img[body] = rng.normal(40, 10, body.sum())
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(-0.25, 0.25, 2)
        r = rng.uniform(0.04, 0.12)
        img[((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) & body] = rng.uniform(150, 700)
    return img.round().astype(np.int16)


def write_shards(out: Path, n_shards: int = 8, per_shard: int = 16, size: int = 40, seed: int = 0,
                 rgb: bool = False, val_shards: int = 0, labels: bool = False) -> Path:
    """Write ``train-NNNNNN.tar`` shards (then ``val_shards`` ``val-`` ones) plus index.json;
    ``labels``: each sample's json gets ``label`` 1 when it has a blob of 300 HU or more."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = {}
    for s in range(n_shards + val_shards):
        split = "train" if s < n_shards else "val"
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(per_shard):
                meta = {"modality": "CT", "body_part": None, "view": None, "pixel_spacing": [1.0, 1.0],
                        "slice_index": i, "patient": f"p-{s:016x}", "study": None, "series": None}
                if rgb:
                    png = encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                    meta.update(channels=3, intensity={"offset": 0.0, "slope": 1.0, "unit": None}, window=None)
                else:
                    image = synthetic_ct(rng, size)
                    if labels:
                        meta["label"] = int(image.max() >= 300)
                    stored, offset, slope = encode_intensity(image)
                    png = encode_png(stored)
                    meta.update(channels=1, intensity={"offset": offset, "slope": slope, "unit": "HU"},
                                window={"center": 40.0, "width": 400.0})
                sink.write({"__key__": f"p{s:03d}-{i:012x}", "img.png": png,
                            "json": json.dumps(meta).encode()})
        data = (out / name).read_bytes()
        shards[name] = {"split": split, "samples": per_shard, "sha256": hashlib.sha256(data).hexdigest()}
    index = {"format": "medssl-shards/1", "medssl_version": "0.1.0", "created": "2026", "shards": shards,
             "splits": {"train": {"samples": n_shards * per_shard, "patients": n_shards},
                        **({"val": {"samples": val_shards * per_shard, "patients": val_shards}}
                           if val_shards else {})},
             "inputs": {"seen": 0, "written": 0, "quarantined": 0, "quarantined_by_reason": {}},
             "labels": None, "config": {}, "modalities": {"CT": n_shards * per_shard}}
    (out / "index.json").write_text(json.dumps(index))
    return out


#: Debug-size volume runs (configs/debug_volumes.yaml is 3-D SimCLR on a tiny MONAI ResNet).
DEBUG_VOLUMES = REPO / "configs" / "debug_volumes.yaml"
#: MAE 3-D at debug size: a two-block MONAI MaskedAutoEncoderViT, 8-voxel patches, one decoder block.
TINY_MAE3D = ["method.name=mae", "model.arch=monai:MaskedAutoEncoderViT",
              "model.kwargs={patch_size: 8, hidden_size: 48, mlp_dim: 96, num_layers: 2, num_heads: 4, "
              + "decoder_mlp_dim: 96}",
              "method.decoder_dim=48", "method.decoder_depth=1", "method.decoder_heads=4", "train.lr=0.002"]


def synthetic_ct_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """``[X, Y, Z]`` int16 HU: air, a body ellipsoid of soft tissue, a few bright blobs."""
    grid = np.meshgrid(*[np.arange(n) / n - 0.5 for n in shape], indexing="ij")
    radii = rng.uniform(0.3, 0.45, 3)
    body = sum((g / r) ** 2 for g, r in zip(grid, radii)) < 1
    vol = np.full(shape, -1000.0)
    vol[body] = rng.normal(40, 10, body.sum())
    for _ in range(rng.integers(1, 4)):
        centre = rng.uniform(-0.2, 0.2, 3)
        r = rng.uniform(0.06, 0.14)
        vol[(sum((g - c) ** 2 for g, c in zip(grid, centre)) < r * r) & body] = rng.uniform(150, 700)
    return vol.round().astype(np.int16)


def write_volume_shards(out: Path, n_shards: int = 8, per_shard: int = 4, shape: tuple[int, int, int] = (40, 38, 36),
                        seed: int = 0, val_shards: int = 0, labels: bool = False) -> Path:
    """Volume shards as `medssl shard --volumes` writes them (``vol.npy.gz`` uint16 RAS + json
    with ``spacing``), and an index.json with build_index's keys and ``config.volumes: true``;
    written here so these tests depend on the contract, not on the shard writer."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = {}
    for s in range(n_shards + val_shards):
        split = "train" if s < n_shards else "val"
        name = f"{split}-{s:06d}.tar"
        # encoder=False: webdataset's default encoder would np.save the bytes of a .npy.gz
        # member (a pickled object array) and gzip that; the member is already encoded.
        with wds.TarWriter(str(out / name), encoder=False) as sink:
            for i in range(per_shard):
                hu = synthetic_ct_volume(rng, shape)
                stored, offset, slope = encode_intensity(hu)
                meta = {"modality": "CT", "body_part": None, "view": None, "pixel_spacing": None,
                        "slice_index": None, "spacing": [1.5, 1.5, 2.0], "patient": f"p-{s:016x}",
                        "study": None, "series": f"s-{s:08x}-{i}", "channels": 1,
                        "intensity": {"offset": offset, "slope": slope, "unit": "HU"},
                        "window": {"center": 40.0, "width": 400.0}}
                if labels:
                    meta["label"] = int(hu.max() >= 300)
                sink.write({"__key__": f"v{s:03d}-{i:012x}", VOLUME_MEMBER: encode_volume(stored),
                            "json": json.dumps(meta).encode()})
        data = (out / name).read_bytes()
        shards[name] = {"split": split, "samples": per_shard, "sha256": hashlib.sha256(data).hexdigest(),
                        "bytes": len(data)}
    splits = {"train": {"samples": n_shards * per_shard, "patients": n_shards}}
    if val_shards:
        splits["val"] = {"samples": val_shards * per_shard, "patients": val_shards}
    index = {"format": "medssl-shards/1", "medssl_version": "0.1.0", "created": "2026", "shards": shards,
             "splits": splits,
             "inputs": {"seen": 0, "written": 0, "quarantined": 0, "quarantined_by_reason": {},
                        "skipped_slices_by_reason": {}},
             "labels": None, "config": {"volumes": True, "spacing": [1.5, 1.5, 2.0]},
             "modalities": {"CT": (n_shards + val_shards) * per_shard}}
    (out / "index.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="session")
def volume_shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_volume_shards(tmp_path_factory.mktemp("volume_shards"), val_shards=1, labels=True)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))




@pytest.fixture
def make_shards():
    """The shard writer, for tests that need their own layout."""
    return write_shards


def run_env(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: one thread, repo importable, wandb offline and local."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline",
               WANDB_DIR=str(tmp_path), WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WANDB_API_KEY", None)
    return env


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return run_env(tmp_path)


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path: equal before and after means
    byte-identical, nothing added, nothing removed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str], str]:
    """``medssl pretrain CONFIG argv...`` in this process: (exit code, ERROR lines, stderr)."""
    import logging

    from medssl.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capsys.readouterr()
    try:
        code = main(["pretrain", str(DEBUG_CONFIG), *argv])
    finally:
        # main() points logging at this test's captured stderr; later tests must not log there.
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if " ERROR " in line], err


@pytest.fixture(scope="session")
def finished_run(shard_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished debug run (6 steps, checkpoints at 3 and 6) to copy; never modified."""
    from pretrain.trainer import pretrain_command

    out = tmp_path_factory.mktemp("finished") / "run"
    assert pretrain_command(DEBUG_CONFIG, [f"data.shards={shard_dir}", f"output_dir={out}",
                                           "train.keep_checkpoints=2"]) == 0
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of ``finished_run`` (mtimes kept) that a test may damage."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out
