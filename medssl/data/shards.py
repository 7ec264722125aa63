"""Reading side of the shard format: find shards, read index.json, iterate decoded samples.

Pretraining builds its own streaming loader on ``list_shards`` + ``medssl.sample.read_sample``;
fine-tuning and evaluation use ``iter_samples``, a plain deterministic WebDataset pipeline
(no shuffling, every shard in order). A broken sample is counted and logged, and the
iteration fails once more than ``max_errors`` were skipped: nothing is dropped silently.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from webdataset.shardlists import expand_urls

from medssl.data.layout import FORMAT, INDEX_NAME
from medssl.errors import MedsslError
from medssl.sample import ShardSample, read_sample

log = logging.getLogger(__name__)




def read_index(directory: Path | str) -> dict:
    """The parsed ``index.json`` of a shard folder (format ``medssl-shards/1``)."""
    path = Path(directory) / INDEX_NAME
    if not Path(directory).is_dir():
        raise MedsslError(f"{directory}: no such shard folder")
    if not path.is_file():
        raise MedsslError(f"{path}: missing; is {directory} a folder written by `medssl shard`?")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedsslError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    found = index.get("format") if isinstance(index, dict) else None
    if found != FORMAT:
        raise MedsslError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    return index


def list_shards(spec: str | Path, split: str | None = None) -> list[str]:
    """Shard paths for a folder (via index.json), a glob, or a brace pattern, in sorted order.

    ``split`` keeps only that split's shards (``{split}-NNNNNN.tar``). Raises MedsslError when
    nothing matches, or when a brace pattern names a local file that does not exist.
    """
    text = str(spec)
    if Path(text).is_dir():
        index = read_index(text)
        names = sorted(n for n, info in index["shards"].items()
                       if split is None or info.get("split") == split)
        if not names:
            known = sorted({info.get("split") for info in index["shards"].values()})
            raise MedsslError(f"{text}: no shards for split {split!r} (splits present: {known})")
        return [str(Path(text) / n) for n in names]
    if "{" in text and ".." in text:
        urls = expand_urls(text)
        missing = [u for u in urls if "://" not in u and not Path(u).exists()]
        if missing:
            raise MedsslError(f"data.shards {text}: {len(missing)} of {len(urls)} shards do not "
                              f"exist (first: {missing[0]})")
    else:
        urls = sorted(glob.glob(text))
    if split is not None:
        urls = [u for u in urls if Path(u).name.startswith(f"{split}-")]
    if not urls:
        where = f" for split {split!r}" if split else ""
        raise MedsslError(f"data.shards {text}: matches no shard files{where}; give a "
                          "shard folder, a glob (train-*.tar) or a brace pattern "
                          "(train-{000000..000009}.tar)")
    return urls


class ErrorBudget:
    """A WebDataset handler that counts skipped samples and raises past ``max_errors``.

    WebDataset's own ``warn_and_continue`` never stops and sleeps 0.5 s per error; a corrupt
    shard must not silently shrink a benchmark's test set.
    """

    def __init__(self, max_errors: int = 0) -> None:
        self.max_errors = max_errors
        self.errors = 0

    def __call__(self, exn: Exception) -> bool:
        self.errors += 1
        log.warning("skipped a broken shard sample (%d so far): %s: %s",
                    self.errors, type(exn).__name__, exn)
        if self.errors > self.max_errors:
            last = f"{type(exn).__name__}: {exn}"
            raise MedsslError(f"{self.errors} broken shard samples, more than the "
                              f"{self.max_errors} allowed; last: {last}") from exn
        return True


def iter_samples(shards: list[str], max_errors: int = 0) -> Iterator[ShardSample]:
    """Yield every sample as a ``medssl.sample.ShardSample``, in shard order then tar order.

    Every process reads every shard (no node or worker splitting): this is for caching
    labeled data.
    """
    if not shards:
        raise MedsslError("iter_samples: empty shard list")
    budget = ErrorBudget(max_errors)
    dataset = (
        wds.WebDataset(list(shards), shardshuffle=False, handler=budget, nodesplitter=None,
                       workersplitter=None, empty_check=False)
        .map(read_sample, handler=budget)
    )
    yield from dataset
    if budget.errors:
        log.warning("%d broken samples skipped while reading %d shards", budget.errors, len(shards))
