"""Logging set-up: INFO on rank zero, WARNING elsewhere, one format for every command."""

from __future__ import annotations

import logging
import os


def process_rank() -> int:
    """Global rank from the launcher's environment (torchrun, accelerate, Slurm), 0 if none."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once; only rank zero speaks at INFO."""
    level = logging.DEBUG if verbose else logging.INFO
    if process_rank() != 0:
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Third-party libraries are chatty at INFO; keep the user's terminal for medssl.
    for noisy in ("PIL", "matplotlib", "urllib3", "httpx", "filelock", "timm", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
