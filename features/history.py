"""Interaction histories: the positive ad ids a query may know about, most recent first.

Two rules, one implementation (`build_histories`), used for training rows, evaluation queries and
serving requests alike, so what a model trains on is what it is served:
- `before`: the user's positives with a strictly earlier timestamp (events in the same second are
  not "before"), so neither the event itself nor anything later leaks in. This is what a serving
  system knows when a request comes, and what training rows see under time-ordered protocols.
- `all`: all of the user's positives among the given sources, whatever their time, except the
  query's own row. Under a random split the held-out queries know the user's training positives
  at any time, so training rows see the same kind of history (all other training positives).

Sources are the rows that may enter histories (e.g. training positives only, so no held-out label
ever becomes an input). Histories are padded with "" to `length` and keep the most recent entries.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.schema import DEFAULT_SCHEMA, FeatureSchema
from serving.contract import HISTORY, PAD_AD_ID  # HISTORY: the column (and models' input) holding the history

PAD = PAD_AD_ID
RULES = ("before", "all")


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


class _UserPositives:
    """Each user's source positives sorted by (timestamp, row order): ads, timestamps and row labels."""

    def __init__(self, sources: pd.DataFrame, schema: FeatureSchema):
        positives = sources[sources[schema.click].to_numpy() > 0]
        users = positives[schema.user_id].astype(str).to_numpy()
        ts = positives[schema.timestamp].to_numpy()
        order = np.lexsort((np.arange(len(positives)), ts, users))
        self.users = users[order]
        self.ts = ts[order]
        self.ads = positives[schema.ad_id].astype(str).to_numpy()[order]
        self.labels = positives.index.to_numpy()[order]
        starts = np.flatnonzero(np.r_[True, self.users[1:] != self.users[:-1]]) if len(order) else np.zeros(0, int)
        stops = np.r_[starts[1:], len(order)]
        self.span = {self.users[a]: (int(a), int(b)) for a, b in zip(starts, stops, strict=True)}

    def of(self, user: str) -> tuple[int, int]:
        return self.span.get(user, (0, 0))


def build_histories(queries: pd.DataFrame, sources: pd.DataFrame, length: int, rule: str = "before",
                    schema: FeatureSchema = DEFAULT_SCHEMA) -> np.ndarray:
    """Per query row, its history of `length` source positives (most recent first) as [n, length] str.

    `rule` is `before` or `all` (module docstring). Under `all`, a query row that is itself one of
    the sources (same index label) is left out of its own history.
    """
    if rule not in RULES:
        raise ValueError(f"history rule {rule!r}: expected one of {RULES}")
    if length < 0:
        raise ValueError(f"history length must be >= 0, got {length}")
    out = np.full((len(queries), length), PAD, dtype=object)
    if not len(queries) or not length:
        return out
    known = _UserPositives(sources, schema)
    users = queries[schema.user_id].astype(str).to_numpy()
    ts = queries[schema.timestamp].to_numpy()
    labels = queries.index.to_numpy()
    for i, user in enumerate(users):
        start, stop = known.of(user)
        if start == stop:
            continue
        if rule == "before":
            stop = start + int(np.searchsorted(known.ts[start:stop], ts[i], side="left"))
            recent = known.ads[max(start, stop - length):stop][::-1]
        else:
            own = np.flatnonzero(known.labels[start:stop] == labels[i])
            window = known.ads[start:stop] if not len(own) else np.delete(known.ads[start:stop], own)
            recent = window[::-1][:length]
        out[i, :len(recent)] = recent
    return out


def known_positives(queries: pd.DataFrame, sources: pd.DataFrame, rule: str = "before",
                    schema: FeatureSchema = DEFAULT_SCHEMA) -> list[np.ndarray]:
    """Per query row, every source positive its history rule lets it know (no length cap): the ads a
    recommender already knows the user has, which evaluation may exclude from the candidates."""
    known = _UserPositives(sources, schema)
    users = queries[schema.user_id].astype(str).to_numpy()
    ts = queries[schema.timestamp].to_numpy()
    out = []
    for i, user in enumerate(users):
        start, stop = known.of(user)
        if rule == "before" and stop > start:
            stop = start + int(np.searchsorted(known.ts[start:stop], ts[i], side="left"))
        out.append(known.ads[start:stop])
    return out


def with_history(rows: pd.DataFrame, histories: np.ndarray) -> pd.DataFrame:
    """A copy of `rows` with the `history` column (one tuple of ad ids per row)."""
    out = rows.copy()
    out[HISTORY] = list(map(tuple, histories)) if len(rows) else pd.Series([], dtype=object)
    return out


def add_history(logs: pd.DataFrame, length: int, schema: FeatureSchema = DEFAULT_SCHEMA) -> pd.DataFrame:
    """A copy of `logs` with each row's `before` history over the whole log (row order kept)."""
    if length < 0:
        raise ValueError(f"history length must be >= 0, got {length}")
    return with_history(logs, build_histories(logs, logs, length, "before", schema))


def history_lengths(matrix: np.ndarray) -> np.ndarray:
    """How many real (non-padding) entries each history row has."""
    return (np.asarray(matrix) != PAD).sum(axis=1) if np.asarray(matrix).size else np.zeros(len(matrix), int)


def request_history(events: pd.DataFrame, user_id: str, length: int, at: int | None = None,
                    schema: FeatureSchema = DEFAULT_SCHEMA) -> list[str]:
    """The history a serving request for `user_id` carries: their latest `length` positives among
    `events` strictly before `at` (every known positive when `at` is None), most recent first.

    The same rule (`build_histories`, `before`) builds training rows' histories under time-ordered
    protocols, so a model is served the kind of history it trained on.
    """
    when = np.iinfo(np.int64).max if at is None else int(at)
    query = pd.DataFrame({schema.user_id: [str(user_id)], schema.timestamp: [when]}, index=[-1])
    return [a for a in build_histories(query, events, length, "before", schema)[0] if a]
