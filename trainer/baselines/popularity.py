"""Most-popular: the same ranking for every query, by training positives per item.

The floor every personalised method must clear; with `rank_queries`' exclusions it still skips
what the user already has.
"""

from __future__ import annotations

import numpy as np

from features.interactions import Interactions, Queries
from trainer.baselines.base import Scorer


class MostPopular(Scorer):
    """score(item) = its number of training positives."""

    name = "most_popular"

    def fit(self, train: Interactions, validation: Queries | None = None) -> None:
        self.counts = train.item_counts().astype(np.float32)

    def score(self, queries: Queries, start: int, stop: int) -> np.ndarray:
        return np.broadcast_to(self.counts, (stop - start, len(self.counts))).copy()
