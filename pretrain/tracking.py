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
    logs the same steps again, and a step must appear once. A line that is not JSON (the last
    one, cut short by a crash mid-write) is dropped with a warning instead of blocking the
    resume. The truncated file replaces the old one atomically.
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.is_file():
            kept, torn = [], 0
            for line in path.read_text(errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    step = int(record.get("step", 0))
                except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                    torn += 1
                    continue
                if step <= resume_step:
                    kept.append(line)
            if torn:
                log.warning("%s: dropped %d unreadable line(s) (a write cut short by a crash); "
                            "keeping the %d lines up to step %d", path, torn, len(kept), resume_step)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

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
