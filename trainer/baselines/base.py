"""The interface every retrieval method implements for the side-by-side evaluation, and how it is ranked.

A `Scorer` learns from `Interactions` (training positives) and scores the whole catalog for each
query of a `Queries`; `rank_queries` turns its scores into ranks under the query's exclusions, with
the tie rule of `trainer.metrics.ranks_with_exclusions`. Hyperparameters come from `grid()` and are
chosen on a validation split carved from the training rows (never the test rows).
"""

from __future__ import annotations

import numpy as np

from features.interactions import Interactions, Queries
from trainer.metrics import ranks_with_exclusions


class Scorer:
    """A retrieval method: `fit` on training positives, `score` the catalog for queries."""

    name = "scorer"

    def __init__(self, **params):
        self.params = dict(params)

    @classmethod
    def grid(cls) -> list[dict]:
        """Candidate hyperparameters tried on the validation split (a small list)."""
        return [{}]

    def fit(self, train: Interactions, validation: Queries | None = None) -> None:
        """Learn from `train`; a method that trains by epochs may early-stop on `validation`."""
        raise NotImplementedError

    def tuned_params(self) -> dict:
        """The parameters to refit with on all training rows (e.g. with the epoch count early stopping chose)."""
        return dict(self.params)

    def score(self, queries: Queries, start: int, stop: int) -> np.ndarray:
        """float32 [stop - start, n_items] for queries[start:stop]; higher is better."""
        raise NotImplementedError


def rank_queries(scorer: Scorer, queries: Queries, popularity: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """0-based rank of each query's target under `scorer`, exclusions applied, ties broken by popularity."""
    out = []
    for start in range(0, len(queries), batch_size):
        stop = min(start + batch_size, len(queries))
        scores = scorer.score(queries, start, stop)
        out.append(ranks_with_exclusions(scores, queries.targets[start:stop],
                                         [queries.excluded(i) for i in range(start, stop)], popularity))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def history_multi_hot(queries: Queries, start: int, stop: int, n_items: int):
    """Binary CSR [stop - start, n_items]: 1 at each DISTINCT catalog row of the query's history.

    Item-based methods (ItemKNN, EASE) read a history as a set, so an item repeated in it counts once.
    """
    from scipy import sparse

    history = queries.history[start:stop]
    rows, cols = np.nonzero(history >= 0)
    m = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, history[rows, cols])),
                          shape=(stop - start, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m
