"""ItemKNN: item-item cosine similarity on the binary training user x item matrix, with shrinkage.

sim(i, j) = (XᵀX)_ij / (||x_i|| ||x_j|| + shrink), sim(i, i) = 0. Shrinkage pulls similarities
resting on few co-occurrences towards 0. With `neighbors`, each candidate item j keeps only its
`neighbors` most similar items, so score(j) = sum of sim(h, j) over the distinct history items h
among j's neighbors; without it, over all distinct history items. The similarity is never held
as a dense n_items x n_items matrix: the neighbor lists are built a block of rows at a time, and
without a cut the similarity rows of a batch's history items are computed when scoring.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from features.interactions import Interactions, Queries
from trainer.baselines.base import Scorer, history_multi_hot

BLOCK_ELEMENTS = 1 << 24  # similarity entries computed at once (64 MB of float32)


class ItemKNN(Scorer):
    """Item-based nearest neighbours over the same histories and exclusions as every method."""

    name = "itemknn"

    def __init__(self, shrink: float = 0.0, neighbors: int | None = None, block_elements: int = BLOCK_ELEMENTS):
        super().__init__(shrink=shrink, neighbors=neighbors)
        self.block_elements = block_elements

    @classmethod
    def grid(cls) -> list[dict]:
        return [{"shrink": s, "neighbors": k} for s in (0.0, 10.0, 100.0) for k in (100, 500, None)]

    def fit(self, train: Interactions, validation: Queries | None = None) -> None:
        self.n_items = train.n_items
        self._x = train.matrix()
        self._xc = self._x.tocsc()
        self._norms = np.sqrt(np.asarray(self._x.sum(axis=0), np.float32).ravel())
        k = self.params["neighbors"]
        self._weights = None if k is None else self._neighbor_weights(int(k))

    def similarity_rows(self, items: np.ndarray) -> np.ndarray:
        """float32 [len(items), n_items]: sim(h, j) for each h of `items`, 0 at j == h."""
        items = np.asarray(items, np.int64)
        co = (self._xc[:, items].T @ self._x).toarray()  # (XᵀX)[items, :]
        denom = self._norms[items][:, None] * self._norms[None, :] + np.float32(self.params["shrink"])
        sim = np.divide(co, denom, out=np.zeros_like(co), where=denom > 0)
        sim[np.arange(len(items)), items] = 0.0
        return sim

    def _row_blocks(self, n: int):
        step = max(1, self.block_elements // max(self.n_items, 1))
        return (np.arange(a, min(a + step, n)) for a in range(0, n, step))

    def _neighbor_weights(self, k: int) -> sparse.csr_matrix:
        """W [n_items, n_items] with W[h, j] = sim(h, j) for the k items h most similar to j (positive only)."""
        rows, cols, vals = [], [], []
        for block in self._row_blocks(self.n_items):
            sim = self.similarity_rows(block)  # row j: sim(j, ·) = sim(·, j)
            if k < self.n_items:
                top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
                top_vals = np.take_along_axis(sim, top, axis=1)
            else:
                top = np.broadcast_to(np.arange(self.n_items), sim.shape)
                top_vals = sim
            keep = top_vals > 0
            cols.append(np.broadcast_to(block[:, None], top.shape)[keep])
            rows.append(top[keep])
            vals.append(top_vals[keep])
        return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                 shape=(self.n_items, self.n_items), dtype=np.float32)

    def score(self, queries: Queries, start: int, stop: int) -> np.ndarray:
        h = history_multi_hot(queries, start, stop, self.n_items)
        if self._weights is not None:
            return (h @ self._weights).toarray().astype(np.float32)
        out = np.zeros((stop - start, self.n_items), np.float32)
        hc = h.tocsc()
        used = np.flatnonzero(np.diff(hc.indptr))
        for chunk in self._row_blocks(len(used)):
            items = used[chunk]
            out += hc[:, items] @ self.similarity_rows(items)
        return out
