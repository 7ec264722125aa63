"""The command line: every command answers a user mistake with one clear line and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medssl import __version__
from medssl.cli import build_parser, main


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)


def test_version_and_help_list_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out
    help_text = build_parser().format_help()
    for command in ("synth", "shard", "shards", "pretrain", "publish", "finetune", "explain",
                    "leakage", "demo"):
        assert command in help_text


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["-m", "medssl", "shards", "verify", "/no/such/shards"], "/no/such/shards"),
        (["-m", "pretrain", "/no/such.yaml"], "/no/such.yaml: config file not found"),
        (["-m", "finetune", "/no/such.yaml"], "/no/such.yaml: config file not found"),
        (["-m", "medssl", "publish", "/no/such/run", "--out", "/tmp/x"], "/no/such/run"),
        (["-m", "medssl", "explain", "/no/such/bench"], "/no/such/bench/config.yaml: not found"),
        (["-m", "medssl", "leakage", "/no/such/pre", "/no/such/task"], "/no/such/"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, fragment):
    proc = run(*argv)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr          # no traceback
    assert "ERROR" in lines[0] and fragment in lines[0]


def test_pretrain_rejects_an_unknown_key_before_any_work(tmp_path):
    proc = run("-m", "medssl", "pretrain", "configs/debug.yaml", f"output_dir={tmp_path}/run",
               "train.max_stepz=3")
    assert proc.returncode == 2
    assert "unknown key 'train.max_stepz'" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["method.name=mae"], "MAE needs a timm VisionTransformer"),
        (["model.arch=resnet_nope"], "model.arch 'resnet_nope' is not a timm model name"),
        (["model.arch=vit_tiny_patch16_224", "method.name=mae", "augment.crop_size=30"],
         "augment.crop_size 30 is not a multiple of vit_tiny_patch16_224's patch size 16"),
        (["model.arch=vit_tiny_patch16_224"], "cannot work"),   # SimCLR at 32 px on a 224 px ViT
    ],
)
def test_pretrain_model_mistakes_exit_2_before_the_run_dir_is_touched(tmp_path, overrides, fragment):
    # The model is built and run on the meta device while the config is checked, so each of
    # these is found before any work: no run dir, not even a lock file.
    out = tmp_path / "run"
    proc = run("-m", "medssl", "pretrain", "configs/debug.yaml", f"output_dir={out}",
               f"data.shards={tmp_path}/no-shards", *overrides)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("command, config", [("pretrain", "pretrain.config:PretrainConfig"),
                                             ("finetune", "finetune.config:FinetuneRunConfig")])
def test_help_lists_every_config_key_with_its_default_and_meaning(command, config):
    import importlib

    from medssl.config import describe

    module, name = config.split(":")
    docs = describe(getattr(importlib.import_module(module), name))
    undocumented = [d.key for d in docs if not d.meaning]
    assert not undocumented, f"config keys without a one-line meaning: {undocumented}"
    proc = run("-m", "medssl", command, "--help")
    assert proc.returncode == 0
    for d in docs:
        assert d.key in proc.stdout and d.meaning[:30] in " ".join(proc.stdout.split())
