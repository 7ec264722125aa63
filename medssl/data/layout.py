"""The names a shard folder is made of, each spelled once (ARCHITECTURE.md section 3).

A module of constants only, so that readers running in spawned workers can know them
without importing WebDataset (and torch behind it).
"""

INDEX_NAME = "index.json"
FORMAT = "medssl-shards/1"
#: The progress journal an unfinished ``medssl shard`` keeps in its folder (journal.py).
JOURNAL_NAME = ".progress.jsonl"
#: The split names recipes, the writer and the benchmark's tasks use.
SPLITS = ("train", "val", "test")
