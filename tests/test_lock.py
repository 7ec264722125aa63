"""FolderLock: a second holder is refused naming the first; a dead holder's lock is free."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from medssl.lock import LOCK_NAME, FolderLock, FolderLocked

HOLD = "import sys, time; from medssl.lock import FolderLock; l = FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_second_process_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLocked, match=rf"in use by .*pid {holder.pid} on {socket.gethostname()}"):
            FolderLock(tmp_path, "run dir").acquire()
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's flock: the folder is free again.
    with FolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_soft_lock_without_flock_detects_a_dead_holder(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held = tmp_path / (LOCK_NAME + ".held")
    held.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "command": "x"}))
    with FolderLock(tmp_path):                      # stale: taken over
        with pytest.raises(FolderLocked, match="has no flock"):
            FolderLock(tmp_path).acquire()          # live (this process): refused
    assert not held.exists()
    held.write_text(json.dumps({"host": "other-node", "pid": 1, "command": "x"}))
    with pytest.raises(FolderLocked, match="other-node"):
        FolderLock(tmp_path).acquire()              # another host: never broken automatically
