"""How often a same-patient pair is truly two images, on a shard folder (data.positives).

    python benchmarks/pair_rate.py SHARDS [--positives same_patient|same_study] [--pairs N]
        [--workers W] [--pair-buffer B]

Reads the raw stream as pretraining would (per-worker shard slices, seeded shuffle), pairs
it (pretrain/pairs.py) and counts cross-image pairs; decodes nothing.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from pathlib import Path

import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data import resolve_shards, worker_shards
from pretrain.pairs import same_patient_pairs


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards")
    ap.add_argument("--positives", default="same_patient", choices=["same_patient", "same_study"])
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--pair-buffer", type=int, default=1000)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    args = ap.parse_args(argv)
    urls = resolve_shards(args.shards)
    cross = total = 0
    per_worker = args.pairs // args.workers
    for w, mine in enumerate(worker_shards(urls, 0, 1, args.workers)):
        cycle = ({"url": u} for u in itertools.cycle(mine))
        raw = wds.filters._shuffle(iter(wds.tarfile_samples(cycle)), args.shuffle_buffer, 100,
                                   rng=random.Random(f"samples-0-0-{w}"))
        for a, b, _ in itertools.islice(same_patient_pairs(raw, args.positives, args.pair_buffer), per_worker):
            cross += a is not b
            total += 1
    rate = cross / total
    print(f"{args.positives}: {cross} of {total} pairs are two different images ({rate:.1%}); "
          f"{len(urls)} shards, {args.workers} workers, pair buffer {args.pair_buffer}")
    return {"pairs": total, "cross": cross, "rate": rate}


if __name__ == "__main__":
    main()
