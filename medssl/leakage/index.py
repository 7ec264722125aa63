"""Hamming-radius search over packed binary hashes, with faiss' exact binary index.

Why faiss-cpu (``IndexBinaryFlat``: SIMD popcount over the whole set, exact) and not a
BK-tree: measured on this 2-core machine with random hashes, 10,000 radius queries took 0.57 s
against 100,000 64-bit hashes and 9.1 s against 1,000,000 (2.7 s against 100,000 256-bit ones),
while a pure-Python BK-tree needed about 4,000 s for the same 10,000 queries against 100,000
hashes at radius 10 (a radius that large visits most of the tree), and a numpy broadcast
popcount 37 s against 1,000,000. faiss' multi-index hashing (``IndexBinaryMultiHash``) was
slower still at such radii (29 s against 100,000).
"""

from __future__ import annotations

import numpy as np

#: Queries per faiss call: bounds the result buffers, not the answer.
_CHUNK = 4096


class HammingIndex:
    """Exact index of ``[N, n_bytes]`` uint8 packed hashes (``phash`` output)."""

    def __init__(self, hashes: np.ndarray) -> None:
        import faiss  # imported here: only leakage checks need it

        hashes = np.ascontiguousarray(hashes, dtype=np.uint8)
        if hashes.ndim != 2 or hashes.shape[1] == 0:
            raise ValueError(f"expected [N, n_bytes] uint8 hashes, got shape {hashes.shape}")
        self.bits = hashes.shape[1] * 8
        self.size = len(hashes)
        self._index = faiss.IndexBinaryFlat(self.bits)
        if self.size:
            self._index.add(hashes)

    def within(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (query, item) pair at Hamming distance <= ``radius``.

        Returns ``(query_rows, item_rows, distances)``, int64 arrays of equal length, sorted by
        query row then distance.
        """
        queries = np.ascontiguousarray(queries, dtype=np.uint8)
        if queries.ndim != 2 or queries.shape[1] * 8 != self.bits:
            raise ValueError(f"queries must be [M, {self.bits // 8}] uint8, got {queries.shape}")
        rows, items, dists = [], [], []
        if self.size and len(queries):
            for start in range(0, len(queries), _CHUNK):
                # faiss' binary range search is strict (d < radius): ask for radius + 1.
                lims, dist, idx = self._index.range_search(queries[start:start + _CHUNK],
                                                           int(radius) + 1)
                counts = np.diff(lims.astype(np.int64))
                rows.append(np.repeat(np.arange(start, start + len(counts)), counts))
                items.append(idx.astype(np.int64))
                dists.append(dist.astype(np.int64))
        if not rows:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        q, i, d = np.concatenate(rows), np.concatenate(items), np.concatenate(dists)
        order = np.lexsort((i, d, q))
        return q[order], i[order], d[order]
