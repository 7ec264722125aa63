"""Submitting Slurm jobs and polling them, for the tests in this folder."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def sbatch(args: list[str], cwd: Path) -> str:
    """Submit; returns the job id. ``cwd`` is the submit dir (where default logs go)."""
    out = subprocess.run(["sbatch", "--parsable", *args], check=False, cwd=cwd, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, Reason, ExitCode, ...); {} if unknown."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], check=False, capture_output=True, text=True,
                         timeout=30)
    if out.returncode != 0:
        return {}
    # One line per job (array elements each have one); keep the first record.
    line = out.stdout.splitlines()[0] if out.stdout else ""
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))


def array_states(array_id: str) -> list[str]:
    """States of every element of an array job (pending elements may be listed as one record)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", array_id], check=False, capture_output=True, text=True,
                         timeout=30)
    return re.findall(r"JobState=(\S+)", out.stdout)


def wait_for(cond: Callable[[], object], timeout: float, what: str, poll: float = 0.5,
             on_timeout: Callable[[], str] | None = None) -> object:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    detail = on_timeout() if on_timeout else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{detail}")


def cancel(*job_ids: str) -> None:
    """Best-effort clean-up of jobs a failed test leaves behind."""
    ids = [j for j in job_ids if j]
    if ids:
        subprocess.run(["scancel", *ids], check=False, capture_output=True, timeout=30)


FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED")
