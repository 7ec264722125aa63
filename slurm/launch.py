"""One Slurm task per node: start torchrun with the rendezvous taken from Slurm's variables.

``slurm/pretrain.sbatch`` runs ``srun --ntasks-per-node=1 python slurm/launch.py pretrain ARGS...``;
on each node this becomes ``torchrun --nnodes N --node_rank R --nproc_per_node G
--master_addr FIRST_NODE --master_port PORT -m pretrain ARGS...``, run in this process so that
the exit code can say what happened:

* 0   the run finished;
* 75  the run stopped early on a warning signal and is resumable from its last checkpoint
      (EX_TEMPFAIL, the trainer's own code for "stopped early"; the batch script requeues on it);
* anything else: a failure, passed on.

Why not call torchrun directly: torchrun dies on SIGUSR1 (it handles only TERM/INT/HUP/QUIT),
orphaning its workers, and it reports workers that exited 75 as a generic failure (exit 1), which
would make a clean preemption look like a crash. Here SIGUSR1 is added to the signals the elastic
agent forwards to its workers, and a stop is turned back into 75.

Kept outside ``medssl/`` because it only matters under Slurm and has no medssl imports; it is a
plain script so the sbatch files stay thin and this logic stays testable.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

EXIT_RESUMABLE = 75
#: Signals a job receives before its time limit or preemption (sbatch --signal) or on cancel.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
#: Seconds the elastic agent waits for workers to checkpoint after forwarding a stop signal,
#: before SIGKILL. Must stay below the sbatch warning time (--signal=B:USR1@300).
DEFAULT_STOP_TIMEOUT_S = 240

log = logging.getLogger("medssl.slurm")


def gpus_per_node(env: Mapping[str, str]) -> int:
    """Processes to start on this node: its GPUs from the allocation, or 1 on a CPU node."""
    gpus = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if gpus.isdigit() and int(gpus) > 0:
        return int(gpus)
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("NoDevFiles", "-1"):
        return len([d for d in visible.split(",") if d.strip()])
    return 1


def master_port(env: Mapping[str, str]) -> int:
    """A rendezvous port derived from the job id, so jobs sharing a node do not collide."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
    return 15000 + job_id % 20000


def master_addr(env: Mapping[str, str]) -> str:
    """The allocation's first node (host name), where rank 0's rendezvous store listens."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    # Slurm's compressed host lists (node[01-04,07]) are expanded by scontrol, the one tool that
    # parses them exactly as slurmctld does.
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"launch.py: cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol "
                         f"({exc}); set MASTER_ADDR to the first node's host name") from None
    return out[0]


def torchrun_args(env: Mapping[str, str], module: str, args: Sequence[str]) -> list[str]:
    """Arguments to torchrun (not including the program name) for this node of the job."""
    nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")) or 1)
    node_rank = int(env.get("SLURM_NODEID", "0") or 0)
    stop_timeout = int(env.get("MEDSSL_STOP_TIMEOUT_S", DEFAULT_STOP_TIMEOUT_S))
    return [
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--nproc_per_node={gpus_per_node(env)}",
        f"--master_addr={master_addr(env)}",
        f"--master_port={master_port(env)}",
        f"--shutdown-timeout={stop_timeout}",
        "-m",
        module,
        *args,
    ]


def run_torchrun(argv: list[str]) -> int:
    """Run torchrun in-process and map its outcome to 0 / 75 / failure."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # SIGUSR1 is the sbatch warning signal; the agent must forward it instead of dying of it.
    # Recent torch takes it as an option (which then sets the variable); older torch reads the
    # environment variable when it starts the workers.
    signals = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = signals
    parser = get_args_parser()
    if "--signals-to-handle" in parser._option_string_actions:
        argv = [f"--signals-to-handle={signals}", *argv]
    try:
        run(parser.parse_args(argv))
    except SignalException as exc:
        # The agent has passed the signal to its workers and waited for them to checkpoint
        # (their exit codes are not kept). Checkpoints are atomic, so even a worker that failed
        # to write its last one leaves an earlier one to resume from: "resumable" either way.
        if exc.sigval in STOP_SIGNALS:
            log.warning("stopped on %s; resumable from the latest checkpoint", exc.sigval.name)
            return EXIT_RESUMABLE
        log.error("launcher killed by %s", exc.sigval.name)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        if codes == [EXIT_RESUMABLE]:
            log.warning("workers stopped early (exit %d), resumable", EXIT_RESUMABLE)
            return EXIT_RESUMABLE
        log.error("workers failed with exit codes %s", codes)
        bad = [c for c in codes if c != EXIT_RESUMABLE] or [1]
        # A negative code is a worker killed by that signal; report it the way a shell does.
        return bad[-1] if bad[-1] > 0 else 128 - bad[0]
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not argv or argv[0] in ("-h", "--help"):
        sys.stderr.write("usage: launch.py MODULE [ARGS...]  (run by srun, one task per node)\n")
        return 2
    module, args = argv[0], argv[1:]
    targs = torchrun_args(os.environ, module, args)
    log.info("node %s/%s: torchrun %s", os.environ.get("SLURM_NODEID", "0"),
             os.environ.get("SLURM_NNODES", "1"), " ".join(targs[:6]))
    return run_torchrun(targs)


if __name__ == "__main__":
    sys.exit(main())
