"""Image-level leakage guard: near-duplicates between a pretraining and a task shard folder.

A core tool: it reads shard folders (``medssl.data.shards``) and imports no stage. The pieces:
``phash`` (windowed, pose-normalised perceptual hash), ``index`` (exact Hamming search with
faiss), ``scan`` (two folders -> cross-set pairs by sample key) and ``report`` (JSON +
markdown, no paths).
"""

from medssl.leakage.report import from_dict, markdown, to_dict, write_report
from medssl.leakage.scan import (
    DEFAULT_RADIUS,
    HashedSet,
    LeakageResult,
    LeakPair,
    compare,
    find_leaks,
    hash_folder,
)

__all__ = ["DEFAULT_RADIUS", "HashedSet", "LeakPair", "LeakageResult", "compare", "find_leaks",
           "from_dict", "hash_folder", "markdown", "to_dict", "write_report"]
