"""Kill-and-resume with a real signal: the resumed run ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEBUG_VOLUMES, TINY_DINO, TINY_MAE, TINY_MAE3D

from pretrain.checkpoint import latest_checkpoint
from pretrain.trainer import pretrain_command

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.yaml"
STEPS = 10


def _overrides(shards: Path, out: Path, workers: int, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"output_dir={out}", f"train.max_steps={STEPS}", "train.checkpoint_every=4",
            f"data.num_workers={workers}", "train.batch_size=8", *extra]


def _cmd(config: Path, *args: object) -> list[str]:
    return [sys.executable, "-m", "pretrain", str(config), *_overrides(*args)]


def _last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # a line being written
        return 0


#: Every method the resume must hold for (SimCLR is debug.yaml's own): DINO's EMA teacher,
#: centre and schedule step must come back from the checkpoint too.
#: Volumes (configs/debug_volumes.yaml, volume shards): MAE 3-D covers the 3-D augmentation's
#: generator and MONAI's masking, which draws from the global CPU RNG the trainer reseeds every
#: step (the volume loader's skip is the 2-D one, covered with 2 workers above; a SimCLR 3-D
#: case took 37 s of a suite that must stay under 15 minutes).
METHODS = {"simclr": [], "mae": TINY_MAE, "dino": TINY_DINO, "micle": ["data.positives=same_patient"],
           "simclr3d": [], "mae3d": TINY_MAE3D}


@pytest.mark.slow
@pytest.mark.parametrize("workers, method", [(0, "simclr"), (2, "simclr"), (0, "mae"), (0, "dino"), (2, "micle"),
                                             (0, "mae3d")])
def test_signal_then_resume_is_bitwise_equal(request: pytest.FixtureRequest, tmp_path: Path, cli_env: dict,
                                             workers: int, method: str):
    volumes = method.endswith("3d")
    config = DEBUG_VOLUMES if volumes else DEBUG
    shard_dir = request.getfixturevalue("volume_shard_dir" if volumes else "shard_dir")
    rng = random.Random()
    stop_after = rng.randint(1, STEPS - 2)
    sig = rng.choice([signal.SIGTERM, signal.SIGUSR1])
    why = f"{method}: stop after step {stop_after} with {sig.name}, {workers} workers"
    extra = METHODS[method]

    ref, run = tmp_path / "ref", tmp_path / "run"
    # The reference runs in this process (one thread, like the CLI runs): saves an interpreter start.
    assert pretrain_command(config, _overrides(shard_dir, ref, workers, *extra)) == 0

    proc = subprocess.Popen(_cmd(config, shard_dir, run, workers, *extra, "debug.step_sleep=0.25"), env=cli_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while _last_step(run) < stop_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, f"{why}: exit {proc.returncode}\n{err[-3000:]}"
    stopped = torch.load(latest_checkpoint(run), weights_only=True)
    assert stop_after <= stopped["step"] < STEPS, why

    again = subprocess.run(_cmd(config, shard_dir, run, workers, *extra), env=cli_env, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, f"{why}\n{again.stderr[-3000:]}"

    a = torch.load(latest_checkpoint(ref), weights_only=True)
    b = torch.load(latest_checkpoint(run), weights_only=True)
    assert a["step"] == b["step"] == STEPS
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{why}: {key} differs"
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][pid][name])), why
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), why   # appended on resume, no duplicates
