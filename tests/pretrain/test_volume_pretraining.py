"""Volume pretraining: the cube loader, MAE 3-D against MONAI, short runs whose backbone loads
into plain MONAI, the monitor on volume features, and refusals of a mismatched arch/shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DEBUG_CONFIG, DEBUG_VOLUMES, TINY_MAE3D, run_cli, snapshot
from einops import rearrange

from medssl.config import load_config
from medssl.data.sample import VOLUME_MEMBER, encode_volume
from medssl.errors import ConfigError
from medssl.volume_models import net_kwargs
from pretrain.checkpoint import latest_checkpoint
from pretrain.config import PretrainConfig
from pretrain.data import ShardStream, fit_cube, load_sample, resolve_shards
from pretrain.methods import get_method
from pretrain.methods.mae3d import patchify
from pretrain.resolve import resolve_config
from pretrain.trainer import pretrain_command

PREFIX = "backbone.net."


def _cfg(shards: Path, tmp_path: Path, *extra: str) -> PretrainConfig:
    return resolve_config(load_config(PretrainConfig, DEBUG_VOLUMES,
                                      [f"data.shards={shards}", f"output_dir={tmp_path / 'run'}", *extra]))


# --- the loader -------------------------------------------------------------------------

def test_fit_cube_crops_the_centre_and_pads_with_the_lowest_value():
    vol = np.arange(1 * 6 * 5 * 4, dtype=np.uint16).reshape(1, 6, 5, 4) + 7
    assert np.array_equal(fit_cube(vol, 4, "crop"), vol[:, 1:5, 0:4, :])
    padded = fit_cube(vol, 6, "pad")
    assert padded.shape == (1, 6, 6, 6) and padded.dtype == np.uint16
    assert np.array_equal(padded[:, :, 0:5, 1:5], vol) and (padded[:, :, 5, :] == 7).all()
    flat = np.full((1, 40, 38, 36), 1234, dtype=np.uint16)
    for size, fit in ((16, "crop"), (48, "crop"), (20, "pad")):   # area down, trilinear up
        out = fit_cube(flat, size, fit)
        assert out.shape == (1, size, size, size) and (out == 1234).all()


def test_a_volume_sample_loads_as_an_int16_cube(volume_shard_dir: Path):
    import webdataset as wds

    raw = next(iter(wds.tarfile_samples(iter([{"url": resolve_shards(str(volume_shard_dir))[0]}]))))
    item = load_sample(raw, 24)
    assert item["volume"] and item["image"].shape == (1, 24, 24, 24) and item["image"].dtype == torch.int16
    assert item["center"] == 40.0 and item["width"] == 400.0


def test_the_stream_gives_cube_batches_in_a_seeded_order(volume_shard_dir: Path):
    urls = resolve_shards(str(volume_shard_dir))

    def first(skip: int = 0) -> list[torch.Tensor]:
        stream = ShardStream(urls, rank=0, world_size=1, num_workers=1, seed=3, batch_size=2, load_size=20,
                             in_chans=1, shuffle_buffer=8, shuffle_initial=4, max_bad_samples=0,
                             skip_batches=skip, volume=True)
        it = iter(stream)
        return [next(it)["image"] for _ in range(3)]

    a, b = first(), first(skip=1)
    assert a[0].shape == (2, 1, 20, 20, 20)
    assert torch.equal(a[1], b[0]) and torch.equal(a[2], b[1])   # resume skips exactly


def test_a_2d_sample_in_a_volume_run_is_refused_with_its_shard(shard_dir: Path):
    stream = ShardStream(resolve_shards(str(shard_dir)), rank=0, world_size=1, num_workers=1, seed=0,
                         batch_size=2, load_size=20, in_chans=1, shuffle_buffer=1, shuffle_initial=1,
                         max_bad_samples=0, volume=True)
    with pytest.raises(Exception, match=r"train-\d+\.tar: sample .* is a 2-D image"):
        next(iter(stream))


# --- MAE 3-D against MONAI ----------------------------------------------------------------

def _mae(tmp_path: Path, volume_shard_dir: Path):
    cfg = _cfg(volume_shard_dir, tmp_path, *TINY_MAE3D)
    torch.manual_seed(0)
    return cfg, get_method("mae").build(cfg)


def test_patchify_matches_monais_conv_patch_embedding_order(tmp_path: Path, volume_shard_dir: Path):
    _, model = _mae(tmp_path, volume_shard_dir)
    net = model.backbone.net
    conv = net.patch_embedding.patch_embeddings
    x = torch.randn(2, 1, 32, 32, 32)
    tokens = conv(x).flatten(2).transpose(1, 2)                       # MONAI's own order
    weight = rearrange(conv.weight, "h c p1 p2 p3 -> h (p1 p2 p3 c)")  # the patch's voxel order
    assert torch.allclose(patchify(x, net.patch_size) @ weight.T + conv.bias, tokens, atol=1e-4)


def test_mae3d_reconstruction_is_monais_forward_and_works_in_bf16(tmp_path: Path, volume_shard_dir: Path):
    _, model = _mae(tmp_path, volume_shard_dir)
    x = torch.randn(2, 1, 32, 32, 32)
    torch.manual_seed(5)
    ref_pred, ref_mask = model.backbone.net(x)
    torch.manual_seed(5)
    pred, mask = model.reconstruct(x)
    assert torch.equal(mask, ref_mask) and torch.allclose(pred, ref_pred, atol=1e-6)
    assert mask.float().mean() == pytest.approx(0.75) and pred.shape == (2, 64, 8**3)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # MONAI's forward raises here
        loss = model([x])["loss"]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("method", ["simclr", "mae"])
def test_every_trainable_parameter_gets_a_gradient(tmp_path: Path, volume_shard_dir: Path, method: str):
    """DDP waits for a gradient of every trainable parameter: none may be left out."""
    extra = TINY_MAE3D if method == "mae" else []
    cfg = _cfg(volume_shard_dir, tmp_path, *extra)
    model = get_method(method).build(cfg)
    views = [torch.randn(4, 1, 32, 32, 32) for _ in range(get_method(method).n_views)]
    model(views)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(k.startswith((PREFIX, "projection_head.")) for k in model.state_dict())


# --- runs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["simclr", "mae"])
def test_a_short_run_writes_monai_loadable_backbone_weights(tmp_path: Path, volume_shard_dir: Path, method: str):
    from monai.networks import nets

    out = tmp_path / "run"
    extra = TINY_MAE3D if method == "mae" else ["train.channels_last=true"]
    assert pretrain_command(DEBUG_VOLUMES, [f"data.shards={volume_shard_dir}", f"output_dir={out}",
                                            "train.max_steps=3", "train.eval_every=3", "augment.volume_crop_size=24",
                                            *extra]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    arch, kwargs = saved["model"]["arch"], saved["model"]["kwargs"]
    ckpt = torch.load(latest_checkpoint(out), weights_only=True)
    backbone = {k[len(PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(PREFIX)}
    net = getattr(nets, arch.split(":")[1])(**net_kwargs(arch, 1, kwargs))
    net.load_state_dict(backbone)   # strict: every MONAI key, nothing else
    assert set(ckpt["model"]) - {PREFIX + k for k in backbone} <= {k for k in ckpt["model"]
                                                                   if k.startswith("projection_head.")}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in train_rows)
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert evals and 1.0 <= evals[0]["rankme"] <= evals[0]["eval_samples"]
    assert 0.0 <= evals[0]["knn_acc"] <= 1.0   # the val volumes carry labels
    assert saved["volumes"]["crop_size"] == 24 and kwargs.get("img_size", 24) == 24
    from medssl.rundir import read_record

    assert read_record(out).input_size == 24   # what publish writes as the input size: the cube side


@pytest.mark.parametrize("name", ["simclr_resnet3d.yaml", "mae_vit3d.yaml"])
def test_the_gpu_volume_configs_resolve_and_build_at_full_size(name: str, tmp_path: Path):
    """Built on the meta device (no memory): a kwarg MONAI refuses would fail here."""
    cfg = resolve_config(load_config(PretrainConfig, DEBUG_CONFIG.parent / "pretrain" / name,
                                     [f"data.shards={tmp_path / 'none'}", f"output_dir={tmp_path / 'run'}"]))
    assert cfg.augment.volume_crop_size == 96 and cfg.data.volume_size == 112
    if cfg.method.name == "mae":
        assert cfg.model.kwargs["img_size"] == 96 and cfg.model.kwargs["decoder_hidden_size"] == cfg.method.decoder_dim


# --- refusals -----------------------------------------------------------------------------

def test_a_3d_arch_on_2d_shards_is_refused_naming_the_folder(shard_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    code, errors, _ = run_cli(capsys, f"data.shards={shard_dir}", f"output_dir={out}", "model.arch=monai:ResNet")
    assert code == 2 and len(errors) == 1 and str(shard_dir) in errors[0] and "2-D images" in errors[0]
    assert not out.exists()


def test_a_2d_arch_on_volume_shards_is_refused_naming_the_folder(volume_shard_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    before = snapshot(volume_shard_dir)
    code, errors, _ = run_cli(capsys, f"data.shards={volume_shard_dir}", f"output_dir={out}")
    assert code == 2 and len(errors) == 1 and str(volume_shard_dir) in errors[0] and "volumes" in errors[0]
    assert not out.exists() and snapshot(volume_shard_dir) == before


def test_the_member_alone_marks_volume_shards(tmp_path: Path):
    """No index flag (e.g. a glob of shards): the first sample's vol.npy.gz decides."""
    import webdataset as wds

    folder = tmp_path / "glob"
    folder.mkdir()
    with wds.TarWriter(str(folder / "train-000000.tar"), encoder=False) as sink:
        sink.write({"__key__": "a", VOLUME_MEMBER: encode_volume(np.zeros((8, 8, 8), np.uint16)),
                    "json": json.dumps({"channels": 1}).encode()})
    with pytest.raises(ConfigError, match="holds volumes"):
        resolve_config(load_config(PretrainConfig, DEBUG_CONFIG, [f"data.shards={folder}/train-*.tar",
                                                                  f"output_dir={tmp_path / 'run'}"]))


@pytest.mark.parametrize("extra, message", [
    (["method.name=mae"], "needs model.arch=monai:MaskedAutoEncoderViT"),
    (["method.name=dino"], "has no 3-D version"),
    (["model.init=imagenet"], "no ImageNet weights for 3-D backbones"),
    (["model.init=monai-ssl:/nonexistent/model_swinvit.pt"], "file not found"),
    ([*TINY_MAE3D, "model.kwargs={patch_size: 8, hidden_size: 48, num_heads: 4, img_size: 64}"],
     "contradicts augment.volume_crop_size"),
    (["model.arch=monai:SwinUNETR", "model.kwargs={feature_size: 12}", "augment.volume_crop_size=24",
      "data.volume_size=24"], "multiple of 32"),
    (["model.arch=monai:ResNet", "model.kwargs={block: nope, layers: [1, 1, 1, 1]}"], "monai:ResNet"),
    (["augment.volume_crop_size=48"], "must be <= data.volume_size"),
])
def test_volume_configs_that_cannot_work_are_refused_first(volume_shard_dir: Path, tmp_path: Path,
                                                           extra: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        _cfg(volume_shard_dir, tmp_path, *extra)
    assert not (tmp_path / "run").exists()


def test_a_2d_run_recorded_before_the_volume_settings_still_resumes(shard_dir: Path, run_copy: Path, capsys):
    """The volume keys are new settings at their defaults for a 2-D run: not a changed run."""
    from medssl.rundir import read_record

    path = run_copy / "run.json"
    record = json.loads(path.read_text())
    for section, key in (("data", "volume_size"), ("data", "volume_fit"), ("augment", "volume_crop_size"),
                         ("augment", "flip_axes_p")):
        assert key in record["config"][section]
        del record["config"][section][key]
    path.write_text(json.dumps(record))
    code, errors, err = run_cli(capsys, f"data.shards={shard_dir}", f"output_dir={run_copy}", "train.max_steps=7")
    assert code == 0 and not errors, err
    assert read_record(run_copy).input_size == 32   # 2-D: augment.crop_size


def test_a_volume_run_continues_from_published_3d_weights(tmp_path: Path, volume_shard_dir: Path,
                                                           shard_dir: Path):
    """model.init=ssl:DIR for a monai: arch: the published MONAI network, whole and strict, in
    backbone.net; recorded as where the run started; 2-D weights are refused first."""
    from safetensors.torch import load_file

    from medssl.publish import publish_command
    from medssl.rundir import read_record
    from pretrain.init import load_init
    from pretrain.trainer import train

    first = tmp_path / "first"
    base = [f"data.shards={volume_shard_dir}", "train.max_steps=2", "train.checkpoint_every=2",
            "augment.volume_crop_size=24"]
    assert pretrain_command(DEBUG_VOLUMES, [*base, f"output_dir={first}"]) == 0
    published = tmp_path / "published"
    assert publish_command(first, published) == 0
    cfg = _cfg(volume_shard_dir, tmp_path, "augment.volume_crop_size=24", f"model.init=ssl:{published}")
    model = get_method("simclr").build(cfg)
    assert "medssl 3-D weights published" in load_init(model, cfg)
    weights = load_file(published / "model.safetensors")
    state = model.backbone.net.state_dict()
    assert set(state) == set(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
    run = tmp_path / "second"
    assert train(_cfg(volume_shard_dir, tmp_path, "augment.volume_crop_size=24", "train.max_steps=1",
                      "train.checkpoint_every=1", f"model.init=ssl:{published}",
                      f"output_dir={run}")) == 0
    assert "medssl 3-D weights published" in read_record(run).started_from

    flat = tmp_path / "flat"   # 2-D weights for a 3-D run: one line before any work
    assert pretrain_command(DEBUG_CONFIG, [f"data.shards={shard_dir}", f"output_dir={flat}",
                                           "train.max_steps=1", "train.checkpoint_every=1"]) == 0
    assert publish_command(flat, tmp_path / "flat-published") == 0
    with pytest.raises(ConfigError, match="2-D weights"):
        _cfg(volume_shard_dir, tmp_path, f"model.init=ssl:{tmp_path / 'flat-published'}")
