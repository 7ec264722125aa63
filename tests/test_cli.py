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
    for command in ("synth", "shard", "shards", "pretrain", "publish", "finetune", "demo"):
        assert command in help_text


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["-m", "medssl", "shards", "verify", "/no/such/shards"], "/no/such/shards"),
        (["-m", "pretrain", "/no/such.yaml"], "/no/such.yaml: config file not found"),
        (["-m", "finetune", "/no/such.yaml"], "/no/such.yaml: config file not found"),
        (["-m", "medssl", "publish", "/no/such/run", "--out", "/tmp/x"], "/no/such/run"),
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
