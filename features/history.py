"""Per-event interaction history: the user's last N positively-interacted ad ids before each event.

The history of an event is built only from the same user's positive events with a strictly
earlier timestamp (events in the same second are not "before"), so neither the event itself
nor anything later leaks into it. It is computed on the whole log sorted by time, before the
time split: a held-out event may see earlier held-out events of its user, because a serving
system knows them when the request comes. Histories are most recent first, padded with "".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.schema import DEFAULT_SCHEMA, FeatureSchema

HISTORY = "history"  # the column (and the exported models' input) holding the history
PAD = ""


def history_matrix(values, length: int | None = None) -> np.ndarray:
    """Histories (sequences of ad ids) as a [n, length] object array of str, padded with "".

    Longer histories keep their first `length` entries (the most recent ones).
    """
    rows = list(values)
    if length is None:
        length = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), length), PAD, dtype=object)
    for i, r in enumerate(rows):
        r = [str(v) for v in list(r)[:length]]
        out[i, :len(r)] = r
    return out


def add_history(logs: pd.DataFrame, length: int, schema: FeatureSchema = DEFAULT_SCHEMA) -> pd.DataFrame:
    """A copy of `logs` with a `history` column: per row, a tuple of `length` ad ids.

    Positives are rows with `schema.click > 0`. Row order is kept.
    """
    if length < 0:
        raise ValueError(f"history length must be >= 0, got {length}")
    out = logs.copy()
    n = len(out)
    histories = np.full((n, length), PAD, dtype=object)
    if n and length:
        users = pd.factorize(out[schema.user_id].astype(str))[0]
        ts = out[schema.timestamp].to_numpy()
        ads = out[schema.ad_id].astype(str).to_numpy()
        positive = out[schema.click].to_numpy() > 0
        order = np.lexsort((ts, users))  # by user, then time
        users_sorted = users[order]
        bounds = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1], True])
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            rows = order[start:stop]
            pos_rows = rows[positive[rows]]
            if len(pos_rows) == 0:
                continue
            pos_ts, pos_ads = ts[pos_rows], ads[pos_rows]
            # positives strictly before each row's timestamp (pos_ts is sorted: rows are by time)
            before = np.searchsorted(pos_ts, ts[rows], side="left")
            for row, c in zip(rows, before, strict=True):
                if c:
                    recent = pos_ads[max(0, c - length):c][::-1]
                    histories[row, :len(recent)] = recent
    out[HISTORY] = list(map(tuple, histories)) if n else pd.Series([], dtype=object)
    return out


def history_lengths(matrix: np.ndarray) -> np.ndarray:
    """How many real (non-padding) entries each history row has."""
    return (np.asarray(matrix) != PAD).sum(axis=1) if np.asarray(matrix).size else np.zeros(len(matrix), int)
