"""An exclusive lock on a folder medssl writes (a run dir, a shard folder), for shared clusters.

``FolderLock(folder)`` creates ``folder/.medssl.lock`` and holds ``flock`` on it for as long as
the command runs; the file records the holder's host, pid and command so a second command can
refuse in one line that says who holds the folder. ``flock`` is released by the kernel when
the holder dies (kill -9 included), and on NFS (Linux >= 2.6.12) it is emulated with POSIX
byte-range locks served by the lock manager, so it holds across nodes too.

Some cluster file systems (Lustre mounted without ``-o flock``, some FUSE mounts) refuse
``flock`` outright. There the lock falls back to the file's existence (``O_EXCL``), and a
lock left by a dead process is detected by its pid when the holder ran on this host; a lock
from another host is never broken automatically (we cannot see its processes), the message
says how to remove it by hand.

Why not the ``filelock`` package: it takes the same ``flock`` but records no holder, so the
refusal could not say which host and pid hold the folder, and its soft-lock fallback has no
stale-pid check.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from medssl.errors import MedsslError

LOCK_NAME = ".medssl.lock"

#: errno values that mean "this file system does not do flock", not "someone holds it".
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderLocked(MedsslError):
    """Another medssl command holds the folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _holder_text(raw: str) -> str:
    try:
        info = json.loads(raw)
        return f"{info.get('command', 'medssl')} (pid {info.get('pid')} on {info.get('host')})"
    except (json.JSONDecodeError, AttributeError):
        return "another process"


class FolderLock:
    """Context manager: hold an exclusive lock on ``folder`` (created if absent) or raise
    FolderLocked naming the holder. ``what`` names the folder's role in the message."""

    def __init__(self, folder: str | Path, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._soft = False

    def _record(self) -> bytes:
        command = " ".join(Path(sys.argv[0]).name.split()[:1] + sys.argv[1:2]) or "medssl"
        info = {"host": socket.gethostname(), "pid": os.getpid(), "command": command}
        return (json.dumps(info) + "\n").encode()

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            held = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FolderLocked(
                    f"{self.folder}: {self.what} is in use by {_holder_text(held)}; wait for it "
                    "to finish, or use another folder") from None
            if exc.errno not in _NO_FLOCK:
                raise
            return self._acquire_soft()
        except ImportError:  # no fcntl (Windows): existence lock only
            os.close(fd)
            return self._acquire_soft()
        os.ftruncate(fd, 0)
        os.write(fd, self._record())
        self._fd = fd
        return self

    def _acquire_soft(self) -> FolderLock:
        """Existence lock for file systems without flock; a same-host dead pid is stale."""
        soft = self.path.with_name(LOCK_NAME + ".held")
        for _attempt in range(2):
            try:
                fd = os.open(soft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raw = soft.read_text(errors="replace") if soft.exists() else ""
                try:
                    info = json.loads(raw)
                except json.JSONDecodeError:
                    info = {}
                same_host = info.get("host") == socket.gethostname()
                if same_host and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
                    soft.unlink(missing_ok=True)  # the holder died on this host: stale
                    continue
                raise FolderLocked(
                    f"{self.folder}: {self.what} is in use by {_holder_text(raw)} (this file system "
                    f"has no flock; if that process is gone, delete {soft})") from None
            os.write(fd, self._record())
            os.close(fd)
            self._soft = True
            return self
        raise FolderLocked(f"{self.folder}: could not take {soft}")

    def release(self) -> None:
        if self._soft:
            self.path.with_name(LOCK_NAME + ".held").unlink(missing_ok=True)
            self._soft = False
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (unlinking would race)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
