"""Fixtures shared by the shard tests."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The salt the shard tests write with: fixed, so pseudonyms are the same on every run.
TEST_SALT = bytes(range(32))


@pytest.fixture
def salt(tmp_path) -> Path:
    """A salt file outside any shard folder."""
    path = tmp_path / "test.salt"
    path.write_bytes(TEST_SALT)
    return path
