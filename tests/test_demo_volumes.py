"""``medssl demo --volumes``: the 3-D path through every stage, as the demo runs it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from medssl.cli import demo


def _stages(tmp_path: Path) -> list[tuple[str, list[str]]]:
    salt = tmp_path / "demo.salt"
    salt.write_bytes(b"0" * 32)
    return demo.volume_stages(demo.repo_root(), tmp_path, salt)


def test_every_volume_stage_parses_and_names_files_that_exist(tmp_path):
    from medssl.cli import finetune, pretrain, publish, shard, synth

    commands = {m.NAME: m for m in (synth, shard, pretrain, publish, finetune)}
    root = demo.repo_root()
    for what, argv in _stages(tmp_path):
        parser = argparse.ArgumentParser()
        commands[argv[0]].add_arguments(parser)
        parser.parse_args(argv[1:])   # a renamed flag fails here, not ten minutes in
        for arg in argv:
            if arg.startswith(str(root)):
                assert Path(arg).exists(), f"{what}: {arg} missing"


def test_demo_volumes_flag_picks_the_3d_folder(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, volumes=False: seen.update(out=out, v=volumes) or 0)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args(["--volumes"])) == 0
    assert seen == {"out": Path("medssl-demo-3d"), "v": True}


@pytest.mark.slow
def test_volume_path_end_to_end(tmp_path):
    """The demo's own stage list, made small: synth -> shard -> 3-D SimCLR -> publish ->
    benchmark against random -> card with results."""
    small = {
        "synth": ["--patients", "40"],
        "pretrain": ["train.max_steps=6", "train.warmup_steps=1", "train.checkpoint_every=3", "train.batch_size=8",
                     "data.shuffle_buffer=8", "data.shuffle_initial=2", "logging.progress=false"],
        "finetune": ["protocols=[linear]", "label_fractions=[1.0]", "seeds=[0]",
                     "bootstrap.n=50", "evaluation.subgroups=[]"],
    }
    stages = []
    for what, argv in _stages(tmp_path):
        argv = list(argv)
        if argv[0] == "synth":
            i = argv.index("--patients")
            argv[i:i + 2] = small["synth"]
        argv += small.get(argv[0], []) if argv[0] != "synth" else []
        stages.append((what, argv))
    assert demo._run_stages(stages, tmp_path) == 0

    import monai.networks.nets as nets
    from safetensors.torch import load_file

    published = tmp_path / "published"
    config = json.loads((published / "config.json").read_text())
    net = getattr(nets, config["monai"]["net"])(**config["monai"]["kwargs"])
    net.load_state_dict(load_file(published / "model.safetensors"))   # strict
    card = (published / "README.md").read_text()
    assert "3-D" in card and "## Benchmark results" in card
    results = json.loads((tmp_path / "benchmark" / "results.json").read_text())
    ok = {r["init"] for r in results["rows"] if r["status"] == "ok"}
    assert ok == {f"ssl:{published}", "random"}
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["config"]["volumes"] is True
    assert "3-D benchmark" in (tmp_path / "benchmark" / "report.md").read_text()
