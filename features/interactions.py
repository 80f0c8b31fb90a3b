"""Training positives and evaluation queries as integer codes: what every retrieval method is given.

The model and each baseline learn from one `Interactions` (the training positives) and answer one
`Queries` (held-out positives with the history and exclusions each query may use), so no method
sees rows, histories or exclusions that another does not.

Codes: an item is a catalog row (0..n_items-1); a user is a code 0..n_users-1 among the users with
a training positive, and -1 for a user with none. Histories are most recent first, padded with -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PAD_ROW = -1


@dataclass
class Interactions:
    """Training positives: one (user, item, timestamp) per positive row, in time order."""

    users: np.ndarray  # int32 [n]
    items: np.ndarray  # int32 [n]
    timestamps: np.ndarray  # int64 [n]
    n_users: int
    n_items: int
    user_ids: list[str] = field(default_factory=list)  # code -> raw user id
    item_ids: list[str] = field(default_factory=list)  # catalog row -> raw ad id

    def __post_init__(self):
        self.users = np.asarray(self.users, np.int32)
        self.items = np.asarray(self.items, np.int32)
        self.timestamps = np.asarray(self.timestamps, np.int64)
        if not (len(self.users) == len(self.items) == len(self.timestamps)):
            raise ValueError("users, items and timestamps must have one entry per positive")
        if len(self.users) and (self.users.min() < 0 or self.users.max() >= self.n_users):
            raise ValueError(f"user codes must be in [0, {self.n_users})")
        if len(self.items) and (self.items.min() < 0 or self.items.max() >= self.n_items):
            raise ValueError(f"item rows must be in [0, {self.n_items})")

    def __len__(self) -> int:
        return len(self.users)

    def item_counts(self) -> np.ndarray:
        """Training positives per item (float64 [n_items]): most-popular's scores and every tie-break."""
        return np.bincount(self.items, minlength=self.n_items).astype(np.float64)

    def matrix(self):
        """The binary user x item matrix (scipy CSR, float32): 1 where the user has a positive."""
        from scipy import sparse

        m = sparse.csr_matrix((np.ones(len(self.users), np.float32), (self.users, self.items)),
                              shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    def sequences(self) -> list[np.ndarray]:
        """Per user code, the items of their positives in time order (ties keep row order)."""
        order = np.lexsort((np.arange(len(self.users)), self.timestamps, self.users))
        users, items = self.users[order], self.items[order]
        bounds = np.searchsorted(users, np.arange(self.n_users + 1))
        return [items[bounds[u]:bounds[u + 1]] for u in range(self.n_users)]


@dataclass
class Queries:
    """Held-out positives to rank the catalog for, one query each.

    `history` [n, N]: the catalog rows of the query's history, most recent first, PAD_ROW padded;
    `users` [n]: the user's training code or -1; `targets` [n]: the held-out item's catalog row;
    `exclude_indptr` / `exclude_items`: per query (CSR layout) the catalog rows that may not be
    returned (e.g. the user's training positives); `frame`: the query rows with their raw features
    (user and context columns, the history as ad ids), for models that read features.
    """

    history: np.ndarray
    users: np.ndarray
    targets: np.ndarray
    exclude_indptr: np.ndarray
    exclude_items: np.ndarray
    frame: pd.DataFrame | None = None

    def __post_init__(self):
        self.history = np.asarray(self.history, np.int32).reshape(len(self.targets), -1)
        self.users = np.asarray(self.users, np.int32)
        self.targets = np.asarray(self.targets, np.int32)
        self.exclude_indptr = np.asarray(self.exclude_indptr, np.int64)
        self.exclude_items = np.asarray(self.exclude_items, np.int32)
        n = len(self.targets)
        if len(self.users) != n or len(self.exclude_indptr) != n + 1:
            raise ValueError("users, targets and exclusions must have one entry per query")
        if self.frame is not None and len(self.frame) != n:
            raise ValueError("frame must have one row per query")

    def __len__(self) -> int:
        return len(self.targets)

    def excluded(self, i: int | np.integer) -> np.ndarray:
        return self.exclude_items[self.exclude_indptr[i]:self.exclude_indptr[i + 1]]

    def subset(self, mask: np.ndarray) -> Queries:
        """The queries where `mask` is true (exclusions and frame rows follow)."""
        idx = np.flatnonzero(mask)
        lengths = np.diff(self.exclude_indptr)[idx]
        items = (np.concatenate([self.excluded(i) for i in idx]) if len(idx) else np.zeros(0, np.int32))
        return Queries(self.history[idx], self.users[idx], self.targets[idx],
                       np.concatenate([[0], np.cumsum(lengths)]), items,
                       None if self.frame is None else self.frame.iloc[idx].reset_index(drop=True))

    def history_lengths(self) -> np.ndarray:
        return (self.history != PAD_ROW).sum(axis=1)


def exclusion_lists(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-query item arrays -> (indptr, items) CSR layout."""
    lengths = np.array([len(x) for x in lists], np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    items = np.concatenate(lists).astype(np.int32) if len(lists) and indptr[-1] else np.zeros(0, np.int32)
    return indptr, items
