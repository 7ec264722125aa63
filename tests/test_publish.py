"""``medssl publish``: plain timm loads what it writes, bit for bit, and the card tells the
provenance without leaking a path; tampering and impossible pushes fail with one clear line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from medssl.errors import MedsslError
from medssl.models import create_backbone
from medssl.publish import publish_command
from medssl.published import verify_published

INDEX = {
    "format": "medssl-shards/1",
    "medssl_version": "0.1.0",
    "created": "2026",
    "shards": {"train-000000.tar": {"split": "train", "samples": 812, "sha256": "0" * 64}},
    "splits": {"train": {"samples": 812, "patients": 19}, "val": {"samples": 97, "patients": 3},
               "test": {"samples": 101, "patients": 2}},
    "inputs": {"seen": 210, "written": 200, "quarantined": 10,
               "quarantined_by_reason": {"unreadable": 3, "burned_in_annotation": 7}},
    "labels": None,
    "config": {"splits": {"train": 0.8}, "max_side": 512, "shard_size": 1000, "axis": "axial",
               "recipe": None, "salt_id": "5a1t1d0123"},
    "modalities": {"CT": 1010},
}
RESULTS = {
    "format": "medssl-finetune-results/1", "git_sha": "abc", "config": {}, "tasks": {},
    "rows": [{"task": "pneumoniamnist", "init": "ssl:/x/ssl", "init_label": "ssl:ssl", "protocol": "linear",
              "fraction": 1.0, "seed": 0, "n_train": 100, "status": "ok", "key": "k0", "auc": 0.91,
              "acc": 0.85}],
    "aggregates": [
        {"task": "pneumoniamnist", "init": "ssl:/x/ssl", "init_label": "ssl:ssl", "protocol": "linear",
         "fraction": 1.0, "auc_mean": 0.9123, "auc_ci": [0.9011, 0.9234], "acc_mean": 0.8512,
         "acc_ci": [0.84, 0.86], "n_seeds": 3, "n_effective_seeds": 1, "resampling": "patients",
         "n_units": 40},
        {"task": "pneumoniamnist", "init": "imagenet", "init_label": "imagenet", "protocol": "linear",
         "fraction": 0.1, "auc_mean": 0.8766, "n_seeds": 1},   # no CI: rendered without one
    ],
}


class TinySSL(torch.nn.Module):
    """What a pretrain method looks like from outside: a ``backbone`` plus a head."""

    def __init__(self, arch: str, in_chans: int, **kwargs):
        super().__init__()
        self.backbone = timm.create_model(arch, num_classes=0, in_chans=in_chans, **kwargs)
        self.projection = torch.nn.Sequential(torch.nn.Linear(self.backbone.num_features, 16),
                                              torch.nn.ReLU(), torch.nn.Linear(16, 8))


def make_run(root: Path, arch: str = "resnet18", in_chans: int = 1, size: int = 32,
             mean: float = 0.5, std: float = 0.25, modality: str | None = None,
             window: dict | None = None, pipeline: str = "window then scale to [0,1], then (x - mean) / std",
             resolved: dict | None = None, rankme: dict[int, float] | None = None,
             **model_kwargs) -> tuple[Path, TinySSL]:
    """A run dir as medssl pretrain leaves it (run.json, config.yaml, two checkpoints: step 5
    all zeros, step 10 the returned model), plus its shard folder. ``rankme``: step -> the
    RankMe recorded for that checkpoint (train.eval_every). publish reads run.json only
    (medssl/rundir.py)."""
    from medssl.io import sha256_file
    from medssl.rundir import CheckpointEntry, Intensity, RunRecord, ShardSource, write_record

    shards = root / "shards"
    shards.mkdir(parents=True)
    (shards / "index.json").write_text(json.dumps(INDEX))
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    method = TinySSL(arch, in_chans, **{k: v for k, v in model_kwargs.items() if "drop" not in k})
    method.train()
    with torch.no_grad():   # move BN running stats off their init so they are checked too
        for _ in range(2):
            method.backbone(torch.randn(4, in_chans, size, size))
    config = {
        "output_dir": str(run), "seed": 0,
        "data": {"shards": str(shards), "num_workers": 0},
        "model": {"arch": arch, "in_chans": in_chans, "kwargs": model_kwargs},
        "method": {"name": "simclr", "temperature": 0.1},
        "train": {"max_steps": 10, "batch_size": 8, "lr": 0.3, "checkpoint_every": 5},
        "augment": {"crop_size": size},
        "logging": {"wandb": "disabled"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    older = {k: torch.zeros_like(v) for k, v in method.state_dict().items()}
    entries = []
    for step, state in ((5, older), (10, method.state_dict())):
        path = run / "checkpoints" / f"step_{step:08d}.pt"
        torch.save({"format": "medssl-ckpt/1", "step": step, "model": state,
                    "backbone_prefix": "backbone.", "optimizer": {}, "scheduler": {},
                    "scaler": None, "rng": {"torch": torch.get_rng_state()}, "data": {"seen": step},
                    "wandb_id": None, "config": config}, path)
        entries.append(CheckpointEntry(file=path.name, step=step, sha256=sha256_file(path),
                                       bytes=path.stat().st_size, weights_finite=True,
                                       rankme=(rankme or {}).get(step)))
    (run / "checkpoints" / "latest.txt").write_text("step_00000010.pt\n")
    index_sha = hashlib.sha256((shards / "index.json").read_bytes()).hexdigest()
    write_record(run, RunRecord(
        medssl_version="0.1.0", git_sha="abc123def", method="simclr", arch=arch, in_chans=in_chans,
        input_size=size, model_kwargs=dict(model_kwargs),
        intensity=Intensity(pipeline=pipeline, mean=[mean], std=[std], modality=modality, window=window),
        config=config, checkpoints=entries, resolved=dict(resolved or {}),
        data=[ShardSource(folder=str(shards.resolve()), split="train", index_sha256=index_sha,
                          salt_id="5a1t1d0123", shards=4, samples=812)]))
    method.eval()
    return run, method


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("pub")
    run, method = make_run(root, modality="CT", window={"center": 40, "width": 400})
    results = root / "results.json"
    results.write_text(json.dumps(RESULTS))
    out = root / "published"
    assert publish_command(run, out, results=results) == 0
    return root, run, out, method


def test_plain_timm_loads_it_with_the_same_features(published):
    _, _, out, method = published
    state = load_file(str(out / "model.safetensors"))
    fresh = timm.create_model("resnet18", num_classes=0, in_chans=1)
    fresh.load_state_dict(state, strict=True)         # no missing, no unexpected keys
    model = timm.create_model("resnet18", pretrained=True, in_chans=1, num_classes=0,
                              pretrained_cfg_overlay={"file": str(out / "model.safetensors")}).eval()
    trained = method.backbone.state_dict()
    assert set(model.state_dict()) == set(trained)
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), method.backbone(x))


def test_ssl_init_route_gives_the_same_features(published):
    _, _, out, method = published
    model = create_backbone("resnet18", 1, f"ssl:{out}").eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), method.backbone(x))
    assert tuple(model.pretrained_cfg["mean"]) == (0.5,)
    # 3-channel use of 1-channel weights: timm repeats the kernel, scaled by 1/3.
    rgb = create_backbone("resnet18", 3, f"ssl:{out}")
    torch.testing.assert_close(rgb.conv1.weight.sum(1, keepdim=True), model.conv1.weight)
    with pytest.raises(MedsslError, match="resnet18"):
        create_backbone("resnet34", 1, f"ssl:{out}")


def test_config_json_is_timm_hub_layout(published):
    from dataclasses import fields

    from timm.models._pretrained import PretrainedCfg

    _, _, out, _ = published
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet18"
    assert config["num_classes"] == 0 and config["num_features"] == 512
    assert config["model_args"] == {"in_chans": 1, "num_classes": 0}
    cfg = config["pretrained_cfg"]
    # Only keys timm's PretrainedCfg knows: local-dir: and hf-hub: build one from it.
    assert set(cfg) <= {f.name for f in fields(PretrainedCfg)}, set(cfg) - {f.name for f in fields(PretrainedCfg)}
    assert cfg["input_size"] == [1, 32, 32] and cfg["mean"] == [0.5] and cfg["std"] == [0.25]
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0
    assert "hf_hub_id" not in cfg and cfg["license"] == "other"
    ours = config["medssl"]
    assert ours["modality"] == "CT" and ours["window"] == {"center": 40, "width": 400}
    raw = (published[0] / "shards" / "index.json").read_bytes()
    assert ours["method"] == "simclr" and ours["steps"] == 10 and ours["git_sha"] == "abc123def"
    assert ours["source_index_sha256"] == hashlib.sha256(raw).hexdigest()
    assert ours["pretraining_data"] == [{"split": "train", "index_sha256": hashlib.sha256(raw).hexdigest(),
                                         "salt_id": "5a1t1d0123", "shards": 4, "samples": 812}]
    # timm's own hub-config parser accepts it.
    from timm.models._hub import load_model_config_from_path
    _, name, model_args = load_model_config_from_path(out)
    assert name == "resnet18" and model_args["in_chans"] == 1


def test_local_dir_loads_it_the_hub_way_bitwise_equal_to_the_overlay(published):
    # timm.create_model("local-dir:DIR") is the code path of "hf-hub:ORG/NAME" for a pushed
    # copy; it must give exactly the features of the documented overlay load and of training.
    _, _, out, method = published
    hub_way = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    overlay = timm.create_model("resnet18", pretrained=True, in_chans=1, num_classes=0,
                                pretrained_cfg_overlay={"file": str(out / "model.safetensors")}).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(hub_way(x), overlay(x))
        assert torch.equal(hub_way(x), method.backbone(x))
    data = timm.data.resolve_data_config({}, model=hub_way)
    assert data["input_size"] == (1, 32, 32) and tuple(data["mean"]) == (0.5,)


def test_card_has_provenance_and_no_paths(published):
    root, run, out, _ = published
    text = (out / "README.md").read_text()
    assert "**Not for clinical use.**" in text
    for needle in ("| train | 812 | 19 |", "| val | 97 | 3 |", "| test | 101 | 2 |",
                   "Patients in all splits: 24", "CT 1010", "`medssl-shards/1`", "burned_in_annotation 7",
                   "5a1t1d0123", "pneumoniamnist", "0.912 [0.901, 0.923]", "0.877",
                   "defacing", "HMAC", "import timm", 'timm.create_model("local-dir:',
                   "| train | `" + hashlib.sha256((root / "shards" / "index.json").read_bytes()).hexdigest()):
        assert needle in text, needle
    for secret in (str(root), str(run), "/shards", "/run", "/tmp", "pub0"):
        assert secret not in text, secret
    for name in ("config.json", "SHA256SUMS"):
        assert str(root) not in (out / name).read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "other"
    assert "medical-imaging" in card.data.tags


def test_sha256sums_match(published):
    _, _, out, _ = published
    lines = (out / "SHA256SUMS").read_text().splitlines()
    listed = dict(reversed(line.split("  ")) for line in lines)
    assert set(listed) == {"model.safetensors", "config.json", "README.md"}
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, check=False)
    assert check.returncode == 0
    verify_published(out)


def test_one_flipped_byte_is_refused(published, tmp_path):
    import shutil

    _, _, out, _ = published
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(MedsslError, match=r"model\.safetensors.*sha256"):
        create_backbone("resnet18", 1, f"ssl:{copy}")
    (copy / "SHA256SUMS").unlink()
    with pytest.raises(MedsslError, match="SHA256SUMS"):
        verify_published(copy)


def test_republish_replaces_only_a_previous_publish(published, tmp_path):
    _, run, out, _ = published
    assert publish_command(run, out) == 0            # same dir again: allowed
    verify_published(out)
    assert "Benchmark results" not in (out / "README.md").read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(MedsslError, match="notes.txt"):
        publish_command(run, other)
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_missing_checkpoint_or_run_record_is_a_clear_error(tmp_path):
    from medssl.rundir import read_record, write_record

    run, _ = make_run(tmp_path, arch="test_resnet")
    record = read_record(run)
    record.in_chans = 3                      # disagrees with the checkpoint's 1-channel stem
    write_record(run, record)
    with pytest.raises(MedsslError, match="do not fit test_resnet"):
        publish_command(run, tmp_path / "out")
    record.checkpoints = []
    write_record(run, record)
    with pytest.raises(MedsslError, match="lists no checkpoint"):
        publish_command(run, tmp_path / "out")
    (run / "run.json").unlink()
    with pytest.raises(MedsslError, match="run.json: missing"):
        publish_command(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_push_without_token_fails_fast_before_any_work(published, no_token, tmp_path):
    _, run, _, _ = published
    start = time.monotonic()
    with pytest.raises(MedsslError, match="no Hugging Face token") as info:
        publish_command(run, tmp_path / "out", push_to_hub="someone/medssl-test")
    assert time.monotonic() - start < 5
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_push_offline_fails_fast(published, no_token, monkeypatch, tmp_path):
    _, run, _, _ = published
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MedsslError, match="HF_HUB_OFFLINE"):
        publish_command(run, tmp_path / "out", push_to_hub="someone/medssl-test")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("medssl.hub.hub_online", lambda timeout_s=3.0: False)
    with pytest.raises(MedsslError, match="not reachable"):
        publish_command(run, tmp_path / "out", push_to_hub="someone/medssl-test")


def test_cli_push_without_token_is_one_line_exit_2(published, tmp_path):
    _, run, _, _ = published
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "medssl", "publish", str(run), "--out",
                           str(tmp_path / "o"), "--push-to-hub", "someone/x"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "token" in proc.stderr


def test_cli_missing_run_dir_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "medssl", "publish", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "run dir not found" in lines[0]


def test_vit_with_img_size_and_the_records_intensity(tmp_path):
    run, method = make_run(tmp_path, arch="test_vit", in_chans=1, size=32, img_size=32,
                           drop_path_rate=0.1, mean=0.4, std=0.3, modality="MR",
                           window={"center": 300.0, "width": 600.0},
                           pipeline="stored * slope + offset -> window -> [0, 1] -> (x - mean) / std",
                           resolved={"world_size": 1, "peak_lr": 0.0015})
    results = tmp_path / "results.json"
    results.write_text(json.dumps({**RESULTS, "rows": [], "aggregates": [
        {"task": "demo", "init": f"ssl:{tmp_path}/out", "init_label": "ssl:out", "protocol": "linear",
         "fraction": 1.0, "auc_mean": 0.71, "acc_mean": 0.6, "n_seeds": 3, "n_effective_seeds": 3}]}))
    out = tmp_path / "out"
    publish_command(run, out, results=results)
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["img_size"] == 32 and "drop_path_rate" not in config["model_args"]
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [1, 32, 32] and cfg["mean"] == [0.4] and cfg["std"] == [0.3]
    assert config["medssl"]["modality"] == "MR"
    assert config["medssl"]["window"] == {"center": 300.0, "width": 600.0}
    assert config["medssl"]["intensity"].startswith("stored * slope")
    card = (out / "README.md").read_text()
    assert "| demo | ssl:out | linear | 1 | 0.710 | 0.600 | 3 | images |" in card, card
    assert str(tmp_path) not in card and "| train.peak_lr | 0.0015 |" in card
    assert "img_size=32" in card
    model = create_backbone("test_vit", 1, f"ssl:{out}").eval()
    plain = timm.create_model("test_vit", pretrained=True, in_chans=1, num_classes=0, img_size=32,
                              pretrained_cfg_overlay={"file": str(out / "model.safetensors")}).eval()
    hub_way = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), method.backbone(x))
        assert torch.equal(plain(x), method.backbone(x))
        assert torch.equal(hub_way(x), method.backbone(x))


@pytest.mark.parametrize("offline_at_import", [False, True])
def test_push_uploads_our_files_and_reports_failure_in_one_line(published, monkeypatch, tmp_path,
                                                                 offline_at_import):
    import huggingface_hub
    from huggingface_hub import constants

    _, run, _, _ = published
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    # A suite started with HF_HUB_OFFLINE=1 has huggingface_hub's import-time snapshot set;
    # what counts is the environment now.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_at_import)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("medssl.hub.hub_online", lambda timeout_s=3.0: True)
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs.get("exist_ok")))
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"], sorted(kwargs["allow_patterns"]),
                          sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "out"
    assert publish_command(run, out, push_to_hub="org/model") == 0
    assert calls[0] == ("create", "org/model", True)
    assert calls[1][2] == ["README.md", "SHA256SUMS", "config.json", "model.safetensors"]
    assert 'timm.create_model("hf-hub:org/model", pretrained=True)' in (out / "README.md").read_text()

    class DeniedApi(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("401 Client Error: Unauthorized\nInvalid credentials")

    monkeypatch.setattr(huggingface_hub, "HfApi", DeniedApi)
    with pytest.raises(MedsslError, match="401 Client Error: Unauthorized\\)") as info:
        publish_command(run, out, push_to_hub="org/model")
    assert "\n" not in str(info.value)
    verify_published(out)     # the local publish is complete even though the push failed


def test_checkpoint_damaged_after_recording_is_refused_naming_the_intact_one(tmp_path):
    run, _ = make_run(tmp_path)
    assert publish_command(run, tmp_path / "ok") == 0          # verified against run.json
    newest = run / "checkpoints" / "step_00000010.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.raises(MedsslError) as info:
        publish_command(run, tmp_path / "out")
    message = str(info.value)
    assert "step_00000010.pt: sha256 differs from run.json; not publishing it" in message
    assert "newest intact checkpoint is step_00000005.pt (step 5)" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_nonfinite_weights_are_refused(tmp_path):
    run, method = make_run(tmp_path, arch="test_resnet")
    path = run / "checkpoints" / "step_00000010.pt"
    ckpt = torch.load(path, weights_only=True)
    floats = [k for k, v in ckpt["model"].items() if k.startswith("backbone.") and v.is_floating_point()]
    for key in floats[1:]:            # all but the first become NaN or infinite
        ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan") if len(key) % 2 else float("inf"))
    torch.save(ckpt, path)
    # Recorded as it now is (and claimed finite): publish checks the tensors themselves.
    from medssl.io import sha256_file
    from medssl.rundir import read_record, write_record

    record = read_record(run)
    entry = record.entry(path.name)
    entry.sha256, entry.bytes = sha256_file(path), path.stat().st_size
    write_record(run, record)
    n_backbone = sum(1 for k in ckpt["model"] if k.startswith("backbone."))
    with pytest.raises(MedsslError) as info:
        publish_command(run, tmp_path / "out")
    message = str(info.value)
    first = floats[1][len("backbone."):]
    assert f"{len(floats) - 1} of {n_backbone} backbone tensors hold NaN or infinity (first: {first})" in message
    assert "refusing to publish" in message and not (tmp_path / "out").exists()


def _real_shards(run: Path, shards: Path, patients: dict[str, int], salt: str = "5a1t1d0123") -> None:
    """Replace make_run's index-only shard folder by one with a real tar, and record it."""
    import numpy as np
    import webdataset as wds

    from medssl.data.sample import encode_intensity, encode_png
    from medssl.io import sha256_file
    from medssl.rundir import read_record, write_record

    rng = np.random.default_rng(0)
    with wds.TarWriter(str(shards / "train-000000.tar")) as tw:
        for patient, count in patients.items():
            for k in range(count):
                stored, offset, slope = encode_intensity(rng.integers(-500, 500, (8, 8)))
                meta = {"modality": "CT", "patient": patient,
                        "intensity": {"offset": offset, "slope": slope, "unit": "HU"}}
                tw.write({"__key__": f"{patient}-{k:03d}", "img.png": encode_png(stored),
                          "json": json.dumps(meta).encode()})
    n = sum(patients.values())
    index = dict(INDEX, shards={"train-000000.tar": {"split": "train", "samples": n,
                                                     "sha256": sha256_file(shards / "train-000000.tar")}},
                 config=dict(INDEX["config"], salt_id=salt))
    (shards / "index.json").write_text(json.dumps(index))
    record = read_record(run)
    record.data[0].index_sha256 = sha256_file(shards / "index.json")
    record.data[0].samples = n
    record.data[0].shards = 1
    write_record(run, record)


def test_publish_hashes_the_pretraining_patients_without_revealing_them(tmp_path):
    from medssl.leakage.patients import FILE_NAME, hash_patient, published_hashes

    run, _ = make_run(tmp_path)
    patients = {"p-00000000000000a1": 2, "p-00000000000000b2": 1, "p-00000000000000c3": 3}
    _real_shards(run, tmp_path / "shards", patients)
    out = tmp_path / "published"
    assert publish_command(run, out) == 0
    listed = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert FILE_NAME in listed
    hashes = published_hashes(out)
    (source,) = hashes.sources
    assert source.salt_id == "5a1t1d0123" and source.split == "train" and len(source.hashes) == 3
    assert {hash_patient(hashes.nonce, p) for p in patients} == set(source.hashes)
    assert not source.seen(hashes.nonce, ["p-00000000000000ff"])
    for name in listed:                                   # no pseudonym leaves in any file
        text = (out / name).read_bytes()
        assert not any(p.encode() in text or p[2:].encode() in text for p in patients), name
    card = (out / "README.md").read_text()
    digest = hashlib.sha256((tmp_path / "shards" / "index.json").read_bytes()).hexdigest()
    assert f"| train | `{digest}` | `5a1t1d0123` | 1 | 6 | 3 |" in card
    assert "pretraining_patients.json" in card and "HMAC-SHA256" in card
    first = (out / FILE_NAME).read_bytes()
    assert publish_command(run, out) == 0                 # same weights, same file
    assert (out / FILE_NAME).read_bytes() == first
    # a changed sidecar is refused like any listed file
    (out / FILE_NAME).write_bytes(first.replace(b'"train"', b'"test"'))
    with pytest.raises(MedsslError, match="pretraining_patients.json: sha256 does not match"):
        published_hashes(out)
    # shards gone at publish time: no sidecar, none left over, and the card says so
    (tmp_path / "shards" / "train-000000.tar").unlink()
    assert publish_command(run, out) == 0
    assert not (out / FILE_NAME).exists() and FILE_NAME not in (out / "SHA256SUMS").read_text()
    assert "carry no patient hashes" in (out / "README.md").read_text()
    verify_published(out)


# --- --checkpoint latest | best-rankme | STEP ---------------------------------------------------


def _medssl_block(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["medssl"]


def _card_row(out: Path) -> str:
    rows = [line for line in (out / "README.md").read_text().splitlines() if line.startswith("| checkpoint |")]
    assert len(rows) == 1, rows
    return rows[0]


def test_checkpoint_best_rankme_publishes_that_checkpoint_and_says_so(tmp_path):
    # The older checkpoint scores higher: chosen although it is not the newest.
    run, _ = make_run(tmp_path, arch="test_resnet", rankme={5: 7.5, 10: 3.25})
    out = tmp_path / "best"
    assert publish_command(run, out, checkpoint="best-rankme") == 0
    weights = load_file(out / "model.safetensors")
    assert all(not v.any() for v in weights.values())          # step 5's all-zero weights
    medssl = _medssl_block(out)
    assert medssl["checkpoint"] == {"step": 5, "chosen_by": "best-rankme", "rankme": 7.5}
    assert medssl["steps"] == 5
    assert _card_row(out) == "| checkpoint | step 5: the highest RankMe on the val batch (RankMe 7.50) |"
    verify_published(out)


def test_checkpoint_by_step_and_the_default_latest(tmp_path):
    run, method = make_run(tmp_path, arch="test_resnet", rankme={5: 7.5, 10: 3.25})
    assert publish_command(run, tmp_path / "s5", checkpoint="5") == 0
    assert _medssl_block(tmp_path / "s5")["checkpoint"] == {"step": 5, "chosen_by": "step", "rankme": 7.5}
    assert _card_row(tmp_path / "s5") == "| checkpoint | step 5: chosen by step (RankMe 7.50) |"
    assert publish_command(run, tmp_path / "latest") == 0        # today's behaviour: the newest
    medssl = _medssl_block(tmp_path / "latest")
    assert medssl["steps"] == 10 and medssl["checkpoint"]["chosen_by"] == "latest"
    weights = load_file(tmp_path / "latest" / "model.safetensors")
    state = method.backbone.state_dict()
    assert all(torch.equal(weights[k], state[k]) for k in weights)


def test_latest_of_a_run_without_rankme_mentions_none(tmp_path):
    run, _ = make_run(tmp_path, arch="test_resnet")
    assert publish_command(run, tmp_path / "out") == 0
    assert _medssl_block(tmp_path / "out")["checkpoint"] == {"step": 10, "chosen_by": "latest", "rankme": None}
    assert _card_row(tmp_path / "out") == "| checkpoint | step 10: the newest |"


def test_checkpoint_choices_that_cannot_be_met_are_one_line(tmp_path):
    run, _ = make_run(tmp_path, arch="test_resnet")
    with pytest.raises(MedsslError, match=r"no checkpoint has a RankMe \(the run had train.eval_every=0\)"):
        publish_command(run, tmp_path / "a", checkpoint="best-rankme")
    with pytest.raises(MedsslError, match=r"must be latest, best-rankme or a step number"):
        publish_command(run, tmp_path / "b", checkpoint="best")
    (run / "checkpoints" / "step_00000005.pt").unlink()          # recorded, but gone
    with pytest.raises(MedsslError, match=r"step_00000005.pt: missing; not publishing it"):
        publish_command(run, tmp_path / "c", checkpoint="5")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_cli_checkpoint_flag(tmp_path):
    from medssl.cli import build_parser

    args = build_parser().parse_args(["publish", "RUN", "--out", "OUT"])
    assert args.checkpoint == "latest"
    run, _ = make_run(tmp_path, arch="test_resnet")
    proc = subprocess.run([sys.executable, "-m", "medssl", "publish", str(run), "--out", str(tmp_path / "o"),
                           "--checkpoint", "7"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no checkpoint at step 7; recorded steps: 5, 10" in lines[0]
