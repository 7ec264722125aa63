"""``medssl publish`` of a 3-D run (``monai:<Net>``): plain MONAI loads what it writes, strictly,
from config.json's net and kwargs alone; the card says 3-D and keeps every section; the one
reader parses the layout, and finetune's ``ssl:`` route gets the same tensors back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from medssl.errors import MedsslError
from medssl.publish import publish_command
from medssl.published import read_published, verify_published
from medssl.volume_models import create_volume_backbone

KWARGS = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 16, 32]}
SPACING = [1.5, 1.5, 2.0]
INDEX = {
    "format": "medssl-shards/1", "medssl_version": "0.1.0", "created": "2026",
    "shards": {"train-000000.tar": {"split": "train", "samples": 40, "sha256": "0" * 64}},
    "splits": {"train": {"samples": 40, "patients": 8}, "val": {"samples": 5, "patients": 1},
               "test": {"samples": 5, "patients": 1}},
    "inputs": {"seen": 52, "written": 50, "quarantined": 2,
               "quarantined_by_reason": {"slice_gap": 2}},
    "labels": None,
    "config": {"splits": {"train": 0.8}, "volumes": True, "spacing": SPACING, "salt_id": "5a1t1d0123"},
    "modalities": {"CT": 50},
}


class TinyVolumeSSL(torch.nn.Module):
    """What a 3-D pretrain method looks like from outside: a VolumeBackbone plus a head, so the
    checkpoint's backbone keys are ``backbone.net.<MONAI key>``."""

    def __init__(self, arch: str, in_chans: int, kwargs: dict):
        super().__init__()
        self.backbone = create_volume_backbone(arch, in_chans, kwargs)
        self.projection = torch.nn.Linear(self.backbone.num_features, 8)


def make_volume_run(root: Path, arch: str = "monai:ResNet", kwargs: dict | None = None,
                    in_chans: int = 1, size: int = 16) -> tuple[Path, TinyVolumeSSL]:
    """A 3-D run dir as medssl pretrain leaves it: config.yaml, run.json, one checkpoint
    (the layout of pretrain/checkpoint.py), and its shard folder's index.json."""
    from medssl.io import sha256_file
    from medssl.rundir import CheckpointEntry, Intensity, RunRecord, ShardSource, write_record

    kwargs = dict(KWARGS if kwargs is None else kwargs)
    shards = root / "shards"
    shards.mkdir(parents=True)
    (shards / "index.json").write_text(json.dumps(INDEX))
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    method = TinyVolumeSSL(arch, in_chans, kwargs)
    method.train()
    with torch.no_grad():   # BN running stats off their init, so buffers are checked too
        method.backbone(torch.randn(2, in_chans, size, size, size))
    method.eval()
    config = {"output_dir": str(run), "seed": 0, "data": {"shards": str(shards)},
              "model": {"arch": arch, "in_chans": in_chans, "kwargs": kwargs},
              "method": {"name": "simclr"}, "train": {"max_steps": 10, "batch_size": 4, "lr": 0.1},
              "augment": {"crop_size": size}, "logging": {"wandb": "disabled"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    path = run / "checkpoints" / "step_00000010.pt"
    torch.save({"format": "medssl-ckpt/1", "step": 10, "model": method.state_dict(),
                "backbone_prefix": "backbone.", "optimizer": {}, "scheduler": {}, "scaler": None,
                "rng": {"torch": torch.get_rng_state()}, "data": {"seen": 10}, "wandb_id": None,
                "config": config}, path)
    (run / "checkpoints" / "latest.txt").write_text(path.name + "\n")
    index_sha = hashlib.sha256((shards / "index.json").read_bytes()).hexdigest()
    write_record(run, RunRecord(
        medssl_version="0.1.0", git_sha="abc123def", method="simclr", arch=arch, in_chans=in_chans,
        input_size=size, model_kwargs=kwargs,
        intensity=Intensity(pipeline="window then scale to [0,1], then (x - mean) / std",
                            mean=[0.5], std=[0.25], modality="CT", window={"center": 40, "width": 400}),
        config=config, resolved={},
        checkpoints=[CheckpointEntry(file=path.name, step=10, sha256=sha256_file(path),
                                     bytes=path.stat().st_size, weights_finite=True)],
        data=[ShardSource(folder=str(shards.resolve()), split="train", index_sha256=index_sha,
                          salt_id="5a1t1d0123", shards=1, samples=40)]))
    return run, method


@pytest.fixture(scope="module")
def published3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("pub3d")
    run, method = make_volume_run(root)
    out = root / "published"
    assert publish_command(run, out) == 0
    return root, out, method


def test_plain_monai_loads_it_strictly_from_config_json(published3d):
    import monai.networks.nets
    import safetensors.torch

    _, out, method = published3d
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "monai:ResNet" and config["monai"]["net"] == "ResNet"
    kwargs = config["monai"]["kwargs"]
    assert kwargs == method.backbone.net_kwargs == {**KWARGS, "feed_forward": False,
                                                    "n_input_channels": 1, "spatial_dims": 3}
    # The line the card promises, exactly (strict by default).
    net = monai.networks.nets.ResNet(**kwargs)
    net.load_state_dict(safetensors.torch.load_file(out / "model.safetensors"))
    trained = method.backbone.net.state_dict()
    assert set(net.state_dict()) == set(trained)
    for key, value in net.state_dict().items():
        assert torch.equal(value, trained[key]), key
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), method.backbone(x))
    assert config["num_features"] == method.backbone.num_features == 32
    assert config["input"]["input_size"] == [1, 16, 16, 16]
    assert config["input"]["mean"] == [0.5] and config["input"]["std"] == [0.25]
    assert config["medssl"]["spatial_dims"] == 3 and config["medssl"]["spacing"] == SPACING
    assert "pretrained_cfg" not in config       # no timm layout to mislead a timm loader


def test_reader_parses_the_3d_layout(published3d):
    _, out, _ = published3d
    pub = read_published(out)
    assert pub.is_volume and pub.spatial_dims == 3
    assert pub.arch == "monai:ResNet" and pub.monai_net == "ResNet"
    assert pub.input_size == (1, 16, 16, 16) and pub.in_chans == 1
    assert pub.spacing == tuple(SPACING) and pub.window == (40.0, 400.0) and pub.modality == "CT"
    assert pub.method == "simclr" and pub.steps == 10
    with pytest.raises(MedsslError, match="not a timm model"):
        pub.timm_overlay()


def test_card_says_3d_and_keeps_every_section(published3d):
    _, out, _ = published3d
    card = ModelCard.load(out / "README.md")
    text = card.text
    assert card.data.library_name == "monai" and "3d" in card.data.tags
    assert "**3-D**" in text and "16×16×16 voxel cubes" in text and "1.5×1.5×2 mm voxels" in text
    assert "monai.networks.nets.ResNet" in text and "local-dir:" in text   # says it does not apply
    for section in ("## Model description", "## Data provenance", "## De-identification",
                    "## Training", "## Intended use", "## Limitations", "## How to load"):
        assert section in text, section
    assert "Not for clinical use" in text and "sha256sum -c SHA256SUMS" in text
    assert "| input size (voxels) | 16×16×16 |" in text
    assert "comparison against random initialisation" in text    # no ImageNet in 3-D
    assert str(out.parent) not in text        # no path reaches the card


def test_sha256sums_cover_the_dir_and_catch_tampering(published3d, tmp_path):
    import shutil

    _, out, _ = published3d
    listed = (out / "SHA256SUMS").read_text()
    assert "model.safetensors" in listed and "config.json" in listed and "README.md" in listed
    verify_published(out)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = json.loads((copy / "config.json").read_text())
    config["monai"]["kwargs"]["layers"] = [2, 2, 2, 2]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(MedsslError, match="sha256 does not match"):
        read_published(copy)


def test_a_checkpoint_that_does_not_fit_the_recorded_net_is_refused(tmp_path):
    from medssl.rundir import read_record, write_record

    run, _ = make_volume_run(tmp_path)
    record = read_record(run)
    record.model_kwargs = {**KWARGS, "block_inplanes": [8, 8, 16, 32]}
    write_record(run, record)
    with pytest.raises(MedsslError, match="do not fit monai:ResNet"):
        publish_command(run, tmp_path / "out")
    assert not (tmp_path / "out" / "SHA256SUMS").exists()
