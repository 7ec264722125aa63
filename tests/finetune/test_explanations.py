"""evaluation.explain in finetune and `medssl explain`: the benchmarked model, explained and checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from finetune_data import write_labeled_shards
from PIL import Image

from finetune.config import FinetuneRunConfig
from finetune.explain.grid import pick_per_class
from finetune.explain_config import ExplainConfig
from finetune.explain_masks import load_masks
from finetune.explanations import check_config
from finetune.runner import finetune_command
from medssl.config import build, describe
from medssl.data.shards import iter_samples, list_shards
from medssl.errors import ConfigError, MedsslError

S = 32
#: write_labeled_shards draws class c's square at row (7c) % 24, column (11c) % 24, 8 px wide.
SQUARE = (11, 7, 19, 15)          # class 1: x0, y0, x1, y1


def _bench(tmp_path, task, protocols, explain, inits=("random",), **extra) -> dict:
    return {"output_dir": str(tmp_path / "bench"), "model": {"arch": "test_efficientnet"},
            "inits": list(inits), "tasks": [{"name": "t", "kind": "shards", "path": str(task)}],
            "protocols": list(protocols), "label_fractions": [1.0], "seeds": [0],
            "input_size": S, "linear": {"Cs": [0.1, 1.0]}, "knn": {"k": [5]},
            "finetune": {"epochs": 2, "batch_size": 16}, "bootstrap": {"n": 20},
            "device": "cpu", "evaluation": {"explain": explain}, **extra}


def _run(tmp_path, tree) -> dict:
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert finetune_command(path, []) == 0
    return json.loads((tmp_path / "bench" / "results.json").read_text())


@pytest.fixture(scope="module")
def linear_bench(tmp_path_factory):
    """A linear-probe benchmark explained with masks: the class-1 square of each test image,
    except one picked positive image deliberately left out of the masks file."""
    root = tmp_path_factory.mktemp("explain")
    task = write_labeled_shards(root / "task", kind="binary", patients=30, per_patient=4, size=S)
    test = list(iter_samples(list_shards(str(task), "test")))
    labels = np.array([[s.label] for s in test])
    pick = pick_per_class(labels, 3, 0)
    positives = [i for i in pick if labels[i, 0] == 1]
    left_out = test[positives[0]].key
    lines = ["key,x0,y0,x1,y1,width,height"]
    for s in test:
        if s.key == left_out:
            continue
        lines.append(f"{s.key},{','.join(map(str, SQUARE))},{S},{S}" if s.label == 1
                     else f"{s.key},,,,,{S},{S}")
    masks = root / "masks.csv"
    masks.write_text("\n".join(lines) + "\n")
    explain = {"n_per_class": 3, "protocol": "linear", "masks": str(masks)}
    results = _run(root, _bench(root, task, ("linear",), explain))
    return {"root": root, "task": task, "results": results, "positives": len(positives),
            "explain": explain}


def test_linear_probe_maps_are_drawn_checked_localised_and_linked(linear_bench):
    root, results = linear_bench["root"], linear_bench["results"]
    entry = results["tasks"]["t"]["explanations"]
    assert entry["settings"]["protocol"] == "linear" and entry["settings"]["fraction"] == 1.0
    (m,) = entry["maps"]
    assert m["status"] == "ok" and m["init"] == "random" and m["n_images"] == 6
    # the refitted probe is the benchmarked one: its probabilities equal the cell's stored ones
    assert m["reproduces"]["max_abs_diff"] < 1e-4
    assert m["verdict"]["trustworthy"] in (True, False, None) and len(m["verdict"]["tests"]) == 2
    assert m["model_randomisation"]["stages"][0]["stage"] == "head"
    assert m["data_randomisation"]["verdict"]["test"] == "data"   # the probe: cheap, so run
    loc = m["localisation"]
    assert loc["n_scored"] == linear_bench["positives"] - 1        # the left-out key is not scored
    assert loc["images_without_mask_entry"] == 1
    for which in ("trained", "randomised"):
        assert 0.0 <= loc[which]["pointing_game"]["score"] <= 1.0
        assert loc[which]["energy_inside"]["chance"] == pytest.approx(64 / S ** 2)
    png = root / "bench" / m["grid"]
    with Image.open(png) as im:
        assert im.size[0] > im.size[1] > 100          # 2 class rows of 3 x 2 panels
    report = (root / "bench" / "report.md").read_text()
    assert f"[grid]({m['grid']})" in report and m["verdict"]["words"] in report
    assert "Localisation on" in report and "pointing game" in report


def test_a_rerun_reads_finished_explanations_back(linear_bench, monkeypatch):
    root = linear_bench["root"]

    def boom(*args, **kwargs):
        raise AssertionError("a finished map set must not be recomputed")

    monkeypatch.setattr("finetune.explanations._explain_one", boom)
    assert finetune_command(root / "ft.yaml", []) == 0
    again = json.loads((root / "bench" / "results.json").read_text())
    assert again["tasks"]["t"]["explanations"] == linear_bench["results"]["tasks"]["t"]["explanations"]


def test_medssl_explain_command_on_a_finished_benchmark(linear_bench, capsys):
    from medssl.cli import main

    bench = linear_bench["root"] / "bench"
    assert main(["explain", str(bench), "--n-per-class", "2", "--targets", "true"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("explain: 1 map set(s) (") and "explanations.md" in line
    out = json.loads((bench / "explain" / "explanations.json").read_text())
    (m,) = out["t"]["maps"]
    assert m["n_images"] == 4 and m["targets"] == [0, 0, 1, 1]
    md = (bench / "explain" / "explanations.md").read_text()
    assert "](t/" in md and (bench / "explain" / m["grid"].split("/", 1)[1]).is_file()
    assert main(["explain", str(bench), "--init", "imagenet"]) == 2
    assert main(["explain", str(bench), "--protocol", "finetune"]) == 2   # not benchmarked
    assert main(["explain", str(bench.parent / "nothing")]) == 2


def test_finetuned_model_is_retrained_exactly_and_explained(tmp_path):
    task = write_labeled_shards(tmp_path / "task", kind="multiclass", n_classes=3, patients=15,
                                per_patient=3, size=S)
    results = _run(tmp_path, _bench(tmp_path, task, ("finetune",),
                                    {"n_per_class": 2, "protocol": "finetune"}))
    (m,) = results["tasks"]["t"]["explanations"]["maps"]
    assert m["status"] == "ok" and m["n_images"] == 6
    assert m["reproduces"]["compared"] == "test split"
    assert m["reproduces"]["max_abs_diff"] < 1e-5       # the best epoch of the same run, kept
    assert "not run" in m["data_randomisation"]["status"]
    assert "localisation" not in m
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "Data randomisation not run: costs one more fine-tuning run" in report


def test_run_finetune_keeps_the_best_epochs_weights(tmp_path):
    from finetune.config import FinetuneConfig, TaskConfig
    from finetune.full import Classifier, predict, run_finetune
    from finetune.inits import InitSource
    from finetune.preprocess import Preprocessor
    from finetune.tasks import load_task
    from medssl.init import Init
    from medssl.models import create_backbone

    folder = write_labeled_shards(tmp_path / "s", kind="binary", patients=15, per_patient=2, size=S)
    task = load_task(TaskConfig(name="b", kind="shards", path=str(folder)))

    def make():
        return create_backbone("test_efficientnet", 1, Init("random"))

    prep = Preprocessor(InitSource(Init("random"), "random", 1, (0.5,), (0.25,), None, make), S,
                        "bilinear")
    result = run_finetune(make, task, np.arange(len(task.splits["train"])), prep,
                          FinetuneConfig(epochs=3, batch_size=8), torch.device("cpu"), 0, 32,
                          keep_best=True)
    model = Classifier(make(), task.n_classes)
    model.load_state_dict(result["best_state"])
    again = predict(model, task.splits["test"], prep, torch.device("cpu"), 32, False)
    np.testing.assert_allclose(again, result["test_scores"], atol=1e-6)
    assert "best_state" not in run_finetune(make, task, np.arange(4), prep,
                                            FinetuneConfig(epochs=1, batch_size=8),
                                            torch.device("cpu"), 0, 32)


def test_explain_config_is_checked_before_work(tmp_path):
    base = {"tasks": [{"name": "t", "kind": "shards", "path": str(tmp_path)}],
            "protocols": ["linear"], "label_fractions": [0.5, 1.0], "seeds": [0, 1]}

    def check(**explain):
        check_config(build(FinetuneRunConfig, {**base, "evaluation": {"explain": explain}}))

    check(protocol="linear", fraction=0.5, seed=1)
    for explain, words in (({"protocol": "finetune"}, "not among protocols"),
                           ({"fraction": 0.1}, "not among label_fractions"),
                           ({"seed": 7}, "not among seeds"),
                           ({"method": "rollout"}, "rollout needs a ViT"),
                           ({"masks": str(tmp_path / "none.npz")}, "not found")):
        with pytest.raises(ConfigError, match=words):
            check(**explain)
    with pytest.raises(ConfigError, match="n_per_class"):
        build(FinetuneRunConfig, {**base, "evaluation": {"explain": {"n_per_class": 0}}})
    # every key of evaluation.explain has its one-line meaning (help and docs read them)
    assert all(d.meaning for d in describe(ExplainConfig))


def test_masks_files_npz_and_csv(tmp_path):
    m = np.zeros((8, 8), bool)
    m[2:4, 5:7] = True
    np.savez(tmp_path / "m.npz", **{"k-1": m, "k-2": np.zeros((8, 8), np.uint8)})
    source = load_masks(tmp_path / "m.npz")
    out, missing = source.for_keys(["k-1", "k-2", "k-3"], (16, 16))
    assert missing == 1 and out.shape == (3, 16, 16)
    assert out[0].sum() == 16 and out[0, 4:8, 10:14].all() and not out[1:].any()
    (tmp_path / "b.csv").write_text("key,x0,y0,x1,y1,width,height\n"
                                    "a,0,0,2,2,4,4\na,2,2,4,4,4,4\nb,,,,,4,4\n")
    boxes = load_masks(tmp_path / "b.csv")
    assert boxes.masks["a"].sum() == 8 and not boxes.masks["b"].any()
    (tmp_path / "bad.csv").write_text("key,x0,y0,x1,y1,width,height\na,0,0,9,2,4,4\n")
    with pytest.raises(MedsslError, match=r"bad\.csv: line 2: box .* not inside"):
        load_masks(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("key,x0\na,1\n")
    with pytest.raises(MedsslError, match="missing column"):
        load_masks(tmp_path / "cols.csv")
