"""slurm/launch.py without a cluster: Slurm variables -> torchrun arguments, and the exit codes
it turns a run into (0 done, 75 stopped early and resumable, anything else a failure)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "slurm" / "launch.py"


def _load_launch():
    spec = importlib.util.spec_from_file_location("medssl_slurm_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = _load_launch()


@pytest.mark.parametrize("env, expected", [
    ({}, 1),
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"SLURM_GPUS_ON_NODE": "0", "CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
    ({"CUDA_VISIBLE_DEVICES": "2,5"}, 2),
    ({"CUDA_VISIBLE_DEVICES": ""}, 1),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 1),
])
def test_gpus_per_node(env: dict[str, str], expected: int) -> None:
    assert launch.gpus_per_node(env) == expected


def test_master_port_from_job_id_and_distinct_per_job() -> None:
    a = launch.master_port({"SLURM_JOB_ID": "123456"})
    b = launch.master_port({"SLURM_JOB_ID": "123457"})
    assert a != b and 1024 < a < 65536 and 1024 < b < 65536
    assert launch.master_port({"SLURM_JOB_ID": "7", "MASTER_PORT": "29999"}) == 29999


def test_torchrun_args_for_second_node_of_four() -> None:
    env = {"SLURM_NNODES": "4", "SLURM_NODEID": "1", "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "8",
           "MASTER_ADDR": "gpu017", "MEDSSL_STOP_TIMEOUT_S": "90"}
    args = launch.torchrun_args(env, "pretrain", ["cfg.yaml", "train.max_steps=10"])
    assert args == ["--nnodes=4", "--node_rank=1", "--nproc_per_node=8", "--master_addr=gpu017",
                    f"--master_port={15000 + 42}", "--shutdown-timeout=90",
                    "-m", "pretrain", "cfg.yaml", "train.max_steps=10"]
    # torchrun itself must accept them.
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(args)
    assert (parsed.nnodes, parsed.node_rank, parsed.nproc_per_node) == ("4", 1, "8")
    assert parsed.module and parsed.training_script == "pretrain"


FAKE_TRAINER = textwrap.dedent("""
    # Mimics `python -m pretrain`: trains until told to stop; SIGUSR1/SIGTERM -> exit 75.
    import os, signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    mode = sys.argv[2]
    if mode != "loop":
        sys.exit(int(mode))
    stop = []
    def on_signal(signum, frame):
        stop.append(signum)
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    (out / "started").write_text(os.environ.get("RANK", "?"))
    while not stop:
        time.sleep(0.05)
    (out / "stopped").write_text(str(stop[0]))
    sys.exit(75)
""")


def _run_launcher(tmp_path: Path, mode: str, send: signal.Signals | None = None) -> int:
    (tmp_path / "fake_trainer_mod.py").write_text(FAKE_TRAINER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "MASTER_ADDR": "127.0.0.1",
           "SLURM_JOB_ID": str(40000 + os.getpid() % 20000), "MEDSSL_STOP_TIMEOUT_S": "20"}
    env.pop("SLURM_NNODES", None)
    proc = subprocess.Popen([sys.executable, str(LAUNCH), "fake_trainer_mod", str(tmp_path), mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if send is not None:
            deadline = time.monotonic() + 60
            while not (tmp_path / "started").exists():
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "fake trainer never started"
                time.sleep(0.1)
            proc.send_signal(send)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(out)
    return proc.returncode


def test_usr1_reaches_the_trainer_and_maps_to_75(tmp_path: Path) -> None:
    # Plain torchrun would die of SIGUSR1 and orphan its workers; the launcher must forward it.
    rc = _run_launcher(tmp_path, "loop", send=signal.SIGUSR1)
    assert (tmp_path / "stopped").read_text() == str(int(signal.SIGUSR1))
    assert (tmp_path / "started").read_text() == "0"   # torchrun set the worker's rank
    assert rc == launch.EXIT_RESUMABLE


@pytest.mark.parametrize("worker_code, expected", [("75", 75), ("3", 3)])
def test_worker_exit_codes_pass_through(tmp_path: Path, worker_code: str, expected: int) -> None:
    # torchrun alone reports any non-zero worker as exit 1; 75 must survive as "resumable".
    assert _run_launcher(tmp_path, worker_code) == expected


def test_master_addr_is_the_first_host_of_a_compressed_list() -> None:
    import shutil

    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not installed (run `bash .ci/slurm-up.sh`)")
    assert launch.master_addr({"SLURM_JOB_NODELIST": "gpu[07-09,11],cpu3"}) == "gpu07"
    assert launch.master_addr({"SLURM_JOB_NODELIST": "x", "MASTER_ADDR": "10.0.0.2"}) == "10.0.0.2"
