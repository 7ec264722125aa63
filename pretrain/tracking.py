"""Where a run's numbers go: ``metrics.jsonl`` (always) and Weights & Biases (when enabled)."""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsFile:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped first.

    Those lines were logged after the last checkpoint by the interrupted run; the resumed run
    logs the same steps again, and a step must appear once.
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def start_wandb(mode: str, project: str, name: str | None, run_id: str | None, output_dir: Path,
                config: dict[str, Any]) -> Any:
    """Start (or resume, same id) a wandb run on rank zero; None when disabled.

    ``online`` without an API key (env or netrc) falls back to ``offline`` with a warning,
    so a run never blocks on a login prompt on a compute node.
    """
    if mode == "disabled":
        return None
    import wandb

    wandb_dir = Path(os.environ.get("WANDB_DIR") or output_dir)
    if mode == "online" and not _has_wandb_key():
        log.warning("logging.wandb=online but no WANDB_API_KEY or netrc entry: logging offline "
                    "(sync later with `wandb sync %s/wandb/offline-run-*`)", wandb_dir)
        mode = "offline"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    # run_id None: wandb makes one; the trainer stores run.id in every checkpoint.
    return wandb.init(project=project, name=name, id=run_id, resume="allow", mode=mode,
                      dir=str(wandb_dir), config=config)
