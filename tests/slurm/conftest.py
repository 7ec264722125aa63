"""Helpers for the Slurm tests: a live-cluster check, job submission and polling.

Tests marked ``slurm`` need a running cluster (``.ci/slurm-up.sh`` starts a one-node one); they
are skipped, with the reason, where ``sinfo`` is missing or the controller does not answer.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (run `bash .ci/slurm-up.sh` as root to start a test cluster)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], check=False, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "the Slurm controller does not answer (sinfo timed out); run `bash .ci/slurm-up.sh`"
    states = out.stdout.split()
    if out.returncode != 0 or not states:
        return f"the Slurm cluster does not answer ({out.stderr.strip() or 'no nodes'}); run `bash .ci/slurm-up.sh`"
    if not any(s.rstrip("*~#$@+").startswith(("idle", "mix", "alloc")) for s in states):
        return f"no Slurm node is usable (states: {', '.join(states)})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip unless a Slurm cluster answers and has a usable node."""
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)
