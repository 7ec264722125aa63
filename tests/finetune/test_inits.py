"""ssl:DIR, imagenet and random inits: recipes, SHA256SUMS check, RGB tasks on a 1-channel init."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from finetune_data import ARCH, write_medmnist_npz, write_published

from finetune.inits import fingerprint, load_init
from medssl.init import Init
from finetune.runner import finetune_command
from medssl.errors import MedsslError


def test_ssl_init_loads_published_weights_and_recipe(tmp_path):
    pytest.importorskip("medssl.publish")
    folder, reference = write_published(tmp_path / "pub")
    source = load_init(Init.parse(f"ssl:{folder}"), ARCH, data_channels=3, in_chans=None, imagenet_weights=None)
    assert source.in_chans == 1 and source.mean == (0.5,) and source.std == (0.25,)
    assert source.window == (40.0, 400.0) and source.label == "ssl:pub"
    model = source.make().eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference.eval()(x), atol=1e-6)


def test_tampered_weights_are_refused(tmp_path):
    pytest.importorskip("medssl.publish")
    folder, _ = write_published(tmp_path / "pub")
    before = fingerprint(Init.parse(f"ssl:{folder}"), None)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint(Init.parse(f"ssl:{folder}"), None) == before  # the sums file did not change ...
    with pytest.raises(MedsslError, match="sha256"):     # ... but loading checks the files
        load_init(Init.parse(f"ssl:{folder}"), ARCH, 1, None, None)


def test_grayscale_imagenet_recipe_averages_rgb_stats():
    source = load_init(Init("random"), "resnet18", data_channels=1, in_chans=None, imagenet_weights=None)
    assert source.in_chans == 1
    assert source.mean[0] == pytest.approx(np.mean([0.485, 0.456, 0.406]))
    assert source.std[0] == pytest.approx(np.mean([0.229, 0.224, 0.225]))


@pytest.mark.slow
def test_rgb_ordinal_medmnist_on_grayscale_ssl_init(tmp_path):
    pytest.importorskip("medssl.publish")
    folder, _ = write_published(tmp_path / "pub")
    root = tmp_path / "m"
    write_medmnist_npz(root, "retinamnist", n_classes=5, channels=3)  # 1080/120/400 RGB, ordinal
    cfg = {"output_dir": str(tmp_path / "bench"), "model": {"arch": ARCH},
           "inits": [f"ssl:{folder}", "random"],
           "tasks": [{"name": "retina", "kind": "medmnist", "flag": "retinamnist", "root": str(root)}],
           "protocols": ["linear"], "label_fractions": [1.0], "seeds": [0], "input_size": 28,
           "linear": {"Cs": [0.1]}, "bootstrap": {"n": 50}, "device": "cpu"}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert finetune_command(path, []) == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert [r["status"] for r in results["rows"]] == ["ok", "ok"]
    assert results["tasks"]["retina"]["task"] == "ordinal-regression"
    diff = next(a for a in results["aggregates"] if a["init"] == "random")["diff_vs_ssl"]
    assert diff["reference"] == f"ssl:{folder}" and len(diff["auc_ci"]) == 2
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "Δ ssl:pub − random" in report
