"""slurm/pretrain.sbatch on a real one-node cluster: a job warned mid-run (SIGUSR1, as before a
time limit or preemption) checkpoints, requeues itself, resumes, and ends with the same weights
as an uninterrupted job of the same config."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from slurm_helpers import FINISHED, REPO, cancel, job_fields, sbatch, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MAX_STEPS = 16
CHECKPOINT_EVERY = 4
STEP_SLEEP = 0.5   # s per step of the job to be preempted, so it can be signalled mid-run


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny unlabeled shard folder, built the way a user builds one."""
    root = tmp_path_factory.mktemp("corpus")
    subprocess.run(["medssl", "synth", str(root / "scans"), "--patients", "4", "--slices", "8",
                    "--size", "48"], check=True, capture_output=True, timeout=120)
    subprocess.run(["medssl", "shard", str(root / "scans"), "--out", str(root / "shards"),
                    "--splits", "train=1.0", "--shard-size", "8"], check=True, capture_output=True,
                   timeout=180)
    return root / "shards"


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    name = (run_dir / "checkpoints" / "latest.txt").read_text().strip()
    ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True, map_location="cpu")
    assert ckpt["step"] == MAX_STEPS, f"{run_dir} ended at step {ckpt['step']}, not {MAX_STEPS}"
    return ckpt["model"]


def _steps_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_warning_signal_requeues_and_resumes_to_identical_weights(
        slurm_cluster: None, shards: Path, tmp_path: Path) -> None:
    # One loader worker: Slurm signals every process of the step, the loader's included, and
    # those must survive the warning for the final checkpoint to be written.
    overrides = [f"data.shards={shards}", f"train.max_steps={MAX_STEPS}",
                 f"train.checkpoint_every={CHECKPOINT_EVERY}", "logging.wandb=disabled",
                 "data.num_workers=1"]
    config = str(REPO / "configs" / "debug.yaml")
    script = str(REPO / "slurm" / "pretrain.sbatch")
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "preempted"
    ref_log, run_log = tmp_path / "uninterrupted.out", tmp_path / "preempted.out"
    gone_dir, gone_log = tmp_path / "cancelled", tmp_path / "cancelled.out"
    ref_job = run_job = gone_job = ""
    try:
        # The sleep changes timing only, never the numbers, so the reference runs at full speed.
        ref_job = sbatch([f"--output={ref_log}", script, config, *overrides, f"output_dir={ref_dir}"],
                         cwd=tmp_path)
        run_job = sbatch([f"--output={run_log}", script, config, *overrides, f"output_dir={run_dir}",
                          f"debug.step_sleep={STEP_SLEEP}"], cwd=tmp_path)
        # A cancelled job must stay cancelled, although its trainer also exits 75 on SIGTERM.
        gone_job = sbatch([f"--output={gone_log}", script, config, *overrides, f"output_dir={gone_dir}",
                           f"debug.step_sleep={STEP_SLEEP}"], cwd=tmp_path)

        def log_tail(path: Path = run_log) -> str:
            return path.read_text()[-4000:] if path.exists() else f"(no {path.name})"

        # Mid-run: a checkpoint exists and training is still going.
        def mid_run() -> bool:
            if not (run_dir / "checkpoints" / "latest.txt").exists():
                return False
            steps = _steps_logged(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            assert not steps or steps[-1] < MAX_STEPS - 2, "the run finished before it could be signalled"
            return bool(steps)

        wait_for(mid_run, 180, "the first checkpoint of the job to be preempted", on_timeout=log_tail)
        subprocess.run(["scancel", "--signal=USR1", "--batch", run_job], check=True, timeout=30)
        wait_for(lambda: (gone_dir / "checkpoints" / "latest.txt").exists(), 120,
                 "the first checkpoint of the job to be cancelled", on_timeout=lambda: log_tail(gone_log))
        subprocess.run(["scancel", gone_job], check=True, timeout=30)

        # The job checkpoints, exits 75 and requeues itself: pending with a begin time.
        # (Right after the requeue the reason can read None until the scheduler looks at it.)
        def requeued() -> bool:
            f = job_fields(run_job)
            return (f.get("JobState") == "PENDING" and int(f.get("Restarts", "0")) >= 1
                    and f.get("Reason") == "BeginTime")

        wait_for(requeued, 120, "the job to requeue itself and wait for its begin time",
                 on_timeout=lambda: f"{job_fields(run_job)}\n{log_tail()}")
        # slurmd revokes the first run's credential at the requeue and refuses ("Job credential
        # revoked") a start whose new credential carries the same second; the begin time that
        # requeue sets exists to avoid that. Release it, but not within that second.
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"jobid={run_job}", "StartTime=now"], check=True, timeout=30)

        for job, log in ((run_job, run_log), (ref_job, ref_log)):
            wait_for(lambda job=job: job_fields(job).get("JobState") in FINISHED, 240,
                     f"job {job} to finish", on_timeout=lambda log=log: log_tail(log))
            assert job_fields(job)["JobState"] == "COMPLETED", log_tail(log)
        wait_for(lambda: job_fields(gone_job).get("JobState") in FINISHED, 60, "the cancelled job to end",
                 on_timeout=lambda: log_tail(gone_log))
        gone_log_text = wait_for(lambda: "not requeueing" in gone_log.read_text() and gone_log.read_text(),
                                 60, "the cancelled job's last words", on_timeout=lambda: log_tail(gone_log))
        gone = job_fields(gone_job)
        assert (gone["JobState"], gone["Restarts"]) == ("CANCELLED", "0"), gone_log_text
        assert "requeueing job" not in gone_log_text
    finally:
        cancel(ref_job, run_job, gone_job)

    text = run_log.read_text()
    assert "got SIGUSR1" in text and "requeueing job" in text
    # Stopped by the warning itself (a checkpoint at the signal), not a crash after it.
    assert "stopped by signal at step" in text and "killed by signal" not in text, text[-3000:]
    assert "restart 1: resuming from the latest checkpoint" in text
    assert job_fields(run_job)["Restarts"] == "1"
    assert "restart 1" not in ref_log.read_text()

    # Stopped mid-run, not at the end: the resumed part did real work.
    steps = _steps_logged(run_dir)
    assert steps == list(range(1, MAX_STEPS + 1)), f"metrics.jsonl steps not contiguous: {steps}"
    assert _steps_logged(ref_dir) == list(range(1, MAX_STEPS + 1))

    ref, got = _final_model(ref_dir), _final_model(run_dir)
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different[:5]}"
