"""Fixtures shared by the finetune tests."""

from __future__ import annotations

import pytest
import torch

# Two cores shared by the whole team: one thread keeps each test's timing predictable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # No hub access in tests: ImageNet weights must come from local sources or be skipped.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
