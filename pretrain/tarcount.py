"""Count the samples of a WebDataset tar by reading its member headers only.

Why by hand: ``tarfile`` builds a TarInfo per member and parses every pax record; on a
1,000-sample shard written by WebDataset's TarWriter (4,000 headers, half of them pax) it
takes 142 ms, this 26 ms, reading 512-byte headers with ``pread`` and never the images.
The count is what WebDataset will yield: distinct consecutive keys of regular members,
``__meta__`` members skipped. Stdlib only, so a process pool starts it cheaply.
"""

from __future__ import annotations

import os
import re
import struct
import tarfile
from pathlib import Path

_BLOCK = 512
_ZERO = bytes(_BLOCK)
# WebDataset's grouping: the sample key is the name up to the first dot of its last part,
# and __meta__ members are skipped (webdataset.tariterators).
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
_REGULAR = (b"0", b"\0", b"7")
_NEEDS_TARFILE = (b"g", b"L", b"K", b"S")   # pax global headers, GNU long names, sparse files


class TarDamaged(Exception):
    """A shard's tar structure is damaged or truncated; the message says where."""


def count_samples(path: str | Path) -> int:
    """Samples (distinct consecutive keys, as WebDataset groups them) of a tar, headers only.

    Raises ``TarDamaged`` naming the byte offset when a header is damaged or the file ends
    inside a member. Handled by hand: ustar headers and pax extended headers (``x``, which
    WebDataset's TarWriter writes before every member); anything rarer goes to ``tarfile``.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        reader = _Blocks(fd)
        offset, count, last = 0, 0, None
        pax: dict[bytes, bytes] = {}
        while offset + _BLOCK <= size:
            header = reader.get(offset, _BLOCK)
            if header == _ZERO:
                break
            _check_header(header, offset)
            kind = header[156:157]
            if kind in _NEEDS_TARFILE:
                return _count_with_tarfile(path)
            length = _member_size(header, offset)
            name = header[:100].split(b"\0", 1)[0]
            if header[257:263] == b"ustar\0" and header[345] != 0:   # POSIX prefix field
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            if kind == b"x":    # applies to the next member only
                data = reader.get(offset + _BLOCK, length)
                # WebDataset's records are mtime only: parse just those that rename or resize
                pax = _pax_records(data, offset) if b" path=" in data or b" size=" in data else {}
            else:
                name = pax.get(b"path", name)
                if b"size" in pax:
                    length = int(pax[b"size"])
                pax = {}
            offset += _BLOCK + -(-length // _BLOCK) * _BLOCK
            if offset > size:
                raise TarDamaged(f"member {name.decode(errors='replace')!r} ends past the end of "
                                  f"the file ({size} bytes): truncated")
            if kind not in _REGULAR:
                continue
            key = _sample_key(name.decode("utf-8", errors="surrogateescape"))
            if key is not None and key != last:
                count, last = count + 1, key
        else:   # tar writers (tarfile, GNU tar, WebDataset) always end with zero blocks
            raise TarDamaged(f"no end-of-archive block after byte {offset} of {size}: truncated")
    finally:
        os.close(fd)
    return count


class _Blocks:
    """``pread`` with a small window: a pax header, its records and the member header that
    follows usually sit in one 1.5 KiB read instead of three."""

    WINDOW = 3 * _BLOCK

    def __init__(self, fd: int) -> None:
        self.fd, self.start, self.buf = fd, 0, b""

    def get(self, offset: int, n: int) -> bytes:
        lo = offset - self.start
        if lo < 0 or lo + n > len(self.buf):
            self.start, self.buf = offset, os.pread(self.fd, max(n, self.WINDOW), offset)
            lo = 0
        return self.buf[lo:lo + n]


def _pax_records(data: bytes, offset: int) -> dict[bytes, bytes]:
    """``b"28 mtime=1.5\\n"`` records of a pax header -> ``{b"mtime": b"1.5"}``."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarDamaged(f"pax header at byte {offset} is malformed: damaged") from None
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key] = value
        if length <= 0:
            raise TarDamaged(f"pax header at byte {offset} is malformed: damaged")
        pos += length
    return records


def _check_header(header: bytes, offset: int) -> None:
    field = header[148:156]
    try:
        recorded = int(field.split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        raise TarDamaged(f"tar header at byte {offset} has no valid checksum: damaged") from None
    if recorded == sum(header) - sum(field) + 256:
        return
    # Some old tar writers summed signed bytes; tarfile accepts either, so do we.
    signed = sum(struct.unpack("148b", header[:148])) + 256 + sum(struct.unpack("356b", header[156:]))
    if recorded != signed:
        raise TarDamaged(f"tar header at byte {offset} fails its checksum: damaged")


def _member_size(header: bytes, offset: int) -> int:
    raw = header[124:136]
    if raw[0] & 0x80:          # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(raw[1:], "big")
    try:
        return int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise TarDamaged(f"tar header at byte {offset} has no valid size: damaged") from None


def _sample_key(name: str) -> str | None:
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _META.match(name):
        return None
    match = _KEY.match(name)
    return match.group(1) if match else None


def _count_with_tarfile(path: str | Path) -> int:
    count, last = 0, None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key = _sample_key(member.name) if member.isreg() else None
                if key is not None and key != last:
                    count, last = count + 1, key
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise TarDamaged(f"unreadable tar ({type(exc).__name__}: {exc})") from None
    return count


def count_or_reason(path: str) -> int | str:
    """``count_samples(path)``, or the reason the tar cannot be read."""
    try:
        return count_samples(path)
    except (TarDamaged, OSError) as exc:
        return str(exc)


def main() -> None:
    """Child process of ``count_in_processes``: JSON list of paths in, JSON list of counts out."""
    import json
    import sys

    paths = json.load(sys.stdin)
    json.dump([count_or_reason(p) for p in paths], sys.stdout)


def count_in_processes(paths: list[str], workers: int) -> list[int | str]:
    """``count_or_reason`` of each path, split over ``workers`` fresh interpreters.

    Header parsing is Python and holds the GIL, so threads do not help. Plain child processes
    running this file (stdlib only, ~50 ms to start) rather than multiprocessing: fork would
    copy the caller's threads and CUDA state, and spawn re-imports the caller's main script.
    """
    import json
    import subprocess
    import sys

    chunks = [paths[i::workers] for i in range(workers) if paths[i::workers]]
    procs = [subprocess.Popen([sys.executable, "-I", __file__], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in chunks]
    for proc, chunk in zip(procs, chunks):   # each child reads all of stdin before it starts
        proc.stdin.write(json.dumps(chunk))
        proc.stdin.close()
    results: dict[str, int | str] = {}
    for proc, chunk in zip(procs, chunks):
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"tar header count failed: {err.strip().splitlines()[-1:] or proc.returncode}")
        results.update(zip(chunk, json.loads(out)))
    return [results[p] for p in paths]


if __name__ == "__main__":
    main()
