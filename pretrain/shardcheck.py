"""Check the training shards against their index.json before step 1, in seconds.

A deleted shard, a truncated or damaged tar, or an index.json whose counts are wrong would
otherwise train silently on less data, or fail at an arbitrary step hours later. Before
training, every shard the run will read is checked:

- ``data.verify=quick`` (default): it exists, its size equals index.json's ``bytes`` (when the
  index records it), and the number of samples in its tar headers equals index.json's
  ``samples``. Only the 512-byte member headers are read (each header's checksum checked),
  never the images (pretrain/tarcount.py).
- ``data.verify=full``: also its sha256 against index.json's.

Results are cached in ``<run dir>/logs/shard_checks.json`` by (path, size, mtime in ns), so a
resumed run re-reads only shards that changed; a cached sha256 stands for the file as long as
neither changes. ``medssl shards verify DIR`` remains the complete check (members, metadata,
patient-disjoint splits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.data.layout import INDEX_NAME
from medssl.data.shards import read_index
from medssl.io import sha256_file
from medssl.errors import MedsslError
from medssl.rundir import ShardSource
from pretrain.tarcount import count_in_processes, count_or_reason

log = logging.getLogger(__name__)

CACHE_FORMAT = "medssl-shardcheck/1"
CACHE_NAME = "shard_checks.json"
_POOL_FROM = 64   # shards to count before a process pool pays for its start


@dataclass
class ShardReport:
    """What the check found: the folders read (for the run record) and the sample total."""

    sources: list[ShardSource]
    samples: int
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)   # path -> checked facts


def _counts(paths: list[str], workers: int) -> list[int | str]:
    """Sample count of each tar, or the reason it cannot be read; many shards are split over
    child processes (2,000 shards of 1,000 samples take about 50 s in one)."""
    if len(paths) < _POOL_FROM or workers < 2:
        return [count_or_reason(p) for p in paths]
    return count_in_processes(paths, workers)


def check_shards(urls: list[str], spec: str, split: str, mode: str,
                 cache: dict[str, dict[str, Any]] | None = None,
                 workers: int | None = None) -> ShardReport:
    """Check every shard of ``urls`` against its folder's index.json (``mode``: quick | full).

    Raises MedsslError naming the first bad shard (and how many more) when any fails.
    ``cache`` is ``read_cache``'s result; the report's ``cache`` holds the facts to store.
    """
    cache = cache or {}
    workers = workers or min(8, os.cpu_count() or 1)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if len(local) < len(urls):
        log.warning("data.shards: %d remote shards are not checked before training", len(urls) - len(local))
    by_folder: dict[Path, list[str]] = defaultdict(list)
    for url in local:
        by_folder[Path(url).resolve().parent].append(url)
    problems: list[str] = []
    totals: list[str] = []          # reported after the shards: a bad shard explains a bad total
    sources: list[ShardSource] = []
    shards: list[_Shard] = []
    for folder, paths in sorted(by_folder.items()):
        index, digest = _index_of(folder)
        listed_all = (index or {}).get("shards") or {}
        if index is None:
            log.warning("%s: no %s beside the shards; their counts are not checked against one",
                        folder, INDEX_NAME)
        for url in paths:
            listed = listed_all.get(Path(url).name)
            if index is not None and listed is None:
                problems.append(f"{url}: not listed in {folder / INDEX_NAME}")
            else:
                shards.append(_Shard(url, str(Path(url).resolve()), listed))
        mine = [listed_all[Path(u).name] for u in paths if Path(u).name in listed_all]
        samples = sum(int(info.get("samples", 0)) for info in mine)
        if index is not None and Path(spec).is_dir():    # the whole split: its total must agree
            recorded = ((index.get("splits") or {}).get(split) or {}).get("samples")
            if recorded is not None and int(recorded) != samples:
                totals.append(f"{folder / INDEX_NAME}: split {split!r} says {recorded} samples, "
                              f"its shards list {samples}")
        splits = sorted({str(info.get("split")) for info in mine})
        sources.append(ShardSource(
            folder=str(folder), split="+".join(splits) if splits else None, index_sha256=digest,
            salt_id=((index or {}).get("config") or {}).get("salt_id"), shards=len(paths),
            samples=samples))

    for shard in shards:          # stat: existence and size, and whether the cache still holds
        shard.stat(cache.get(shard.key))
    todo = [s for s in shards if s.problem is None and s.facts.get("samples") is None]
    for shard, count in zip(todo, _counts([s.url for s in todo], workers)):
        if isinstance(count, str):
            shard.problem = count
        else:
            shard.facts["samples"] = count
    for shard in shards:
        shard.compare_count()
    if mode == "full":
        unhashed = [s for s in shards if s.problem is None and not s.facts.get("sha256")]
        with ThreadPoolExecutor(max(1, min(workers, len(unhashed)))) as pool:
            for shard, digest in zip(unhashed, pool.map(lambda s: sha256_file(s.url), unhashed)):
                shard.facts["sha256"] = digest
        for shard in shards:
            shard.compare_sha()
    problems += [f"{s.url}: {s.problem}" for s in shards if s.problem is not None] + totals
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MedsslError(f"data.shards: {problems[0]}{more}; not training on incomplete data: "
                          "restore the shards or re-run `medssl shard` (see `medssl shards verify`)")
    facts = {s.key: s.facts for s in shards}
    for source in sources:   # a folder without index.json: the counts come from the tars
        if source.index_sha256 is None:
            source.samples = sum(facts[str(Path(u).resolve())]["samples"] for u in by_folder[Path(source.folder)])
    return ShardReport(sources=sources, samples=sum(s.samples for s in sources), cache=facts)


class _Shard:
    """One shard under check: its index.json entry, the facts found, the first problem."""

    def __init__(self, url: str, key: str, listed: dict[str, Any] | None) -> None:
        self.url, self.key, self.listed = url, key, listed
        self.facts: dict[str, Any] = {}
        self.problem: str | None = None

    def stat(self, cached: dict[str, Any] | None) -> None:
        try:
            st = os.stat(self.url)
        except FileNotFoundError:
            self.problem = "listed in index.json but missing" if self.listed is not None else "missing"
            return
        expected = (self.listed or {}).get("bytes")
        if expected is not None and int(expected) != st.st_size:
            self.problem = f"{st.st_size} bytes, index.json says {expected}"
            return
        self.facts = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "samples": None, "sha256": None}
        if cached and cached.get("bytes") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns:
            if isinstance(cached.get("samples"), int):
                self.facts["samples"] = cached["samples"]
            self.facts["sha256"] = cached.get("sha256")

    def compare_count(self) -> None:
        if self.problem is None and self.listed is not None and self.facts["samples"] != self.listed.get("samples"):
            self.problem = f"holds {self.facts['samples']} samples, index.json says {self.listed.get('samples')}"

    def compare_sha(self) -> None:
        if self.problem is None and self.listed is not None and self.facts["sha256"] != self.listed.get("sha256"):
            self.problem = "sha256 differs from index.json (the file was changed or damaged)"


def _index_of(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = folder / INDEX_NAME
    if not path.is_file():
        return None, None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return read_index(folder), digest


def warn_if_batch_exceeds(batch_size: int, report: ShardReport, split: str) -> None:
    """One warning when a single step needs more samples than the training split holds."""
    if report.samples and batch_size > report.samples:
        log.warning("train.batch_size %d is larger than the %d samples of split %r in data.shards: "
                    "every step repeats samples; lower train.batch_size or add data",
                    batch_size, report.samples, split)


def read_cache(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Cached shard facts of a run dir (empty when absent or unreadable: it is only a cache)."""
    path = Path(run_dir) / "logs" / CACHE_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); checking every shard again", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("shards"), dict):
        return {}
    return data["shards"]


def write_cache(run_dir: str | Path, facts: dict[str, dict[str, Any]]) -> None:
    """Store ``facts`` (merged over the cached ones) atomically."""
    path = Path(run_dir) / "logs" / CACHE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**read_cache(run_dir), **facts}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, "shards": merged}, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
