"""What a user did before each event, beside the positives of `features/history.py`: counters (how
many earlier events the user had, how many were clicks, how many of the last `window` were clicks)
and the history of earlier negatives (the ads the user saw or rated and did not click).

Like the histories of `features/history.py`, they are built from the same user's events with a
strictly earlier timestamp (events in the same second are not "before"), on the whole log sorted
by time, before the time split: a held-out event sees its user's earlier held-out events, as a
serving system's feature store would. They let a model (and the tabular baselines) know a user's
click rate, overall and lately, without knowing the user id: what carries over to users who
arrive after training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from serving.contract import NEGATIVE_HISTORY, USER_STATS  # the exported models' input names

if TYPE_CHECKING:  # features.schema imports the column names below
    from features.schema import FeatureSchema

# Earlier events of the user, clicks among them, clicks among the user's last `window` earlier events.
USER_EVENTS, USER_CLICKS, RECENT_CLICKS = USER_STATS


def add_user_stats(logs: pd.DataFrame, window: int, schema: FeatureSchema,
                   source: np.ndarray | None = None) -> pd.DataFrame:
    """A copy of `logs` with the int64 columns of `USER_STATS`; row order is kept.

    Clicks are rows with `schema.click > 0`. `window`: how many of the latest earlier events
    `user_recent_clicks` counts over (the number of those events is min(window, user_events));
    earlier events that share one second count in ad id order. `source` (a boolean per row, default
    all): the rows that count as events; the others only receive counts (e.g. held-out rows that
    may know training events but not one another).
    """
    if window < 1:
        raise ValueError(f"recent window must be >= 1, got {window}")
    out = logs.copy()
    n = len(out)
    events, clicks, recent = (np.zeros(n, np.int64) for _ in range(3))
    if n:
        users = pd.factorize(out[schema.user_id].astype(str))[0]
        ts = out[schema.timestamp].to_numpy()
        counted = np.ones(n, bool) if source is None else np.asarray(source, bool)
        click = ((out[schema.click].to_numpy() > 0) & counted).astype(np.int64)
        # by user, then time; events in the same second by ad id, so the counters do not depend on row order
        ads = pd.factorize(out[schema.ad_id].astype(str), sort=True)[0] if schema.ad_id in out else np.zeros(n)
        order = np.lexsort((ads, ts, users))
        bounds = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1], True])
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            rows = order[start:stop]
            sources = rows[counted[rows]]
            cumulative = np.r_[0, np.cumsum(click[sources])]
            before = np.searchsorted(ts[sources], ts[rows], side="left")  # counted events strictly earlier
            events[rows] = before
            clicks[rows] = cumulative[before]
            recent[rows] = cumulative[before] - cumulative[np.maximum(before - window, 0)]
    out[USER_EVENTS], out[USER_CLICKS], out[RECENT_CLICKS] = events, clicks, recent
    return out


def smoothed_rates(events, clicks, recent_clicks, window: int, prior: float, strength: float = 10.0,
                   recent_strength: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """The user's click rate over all earlier events and over the last `window`, each shrunk to
    `prior` with the weight of `strength` (`recent_strength`) pseudo-events."""
    events = np.asarray(events, np.float64)
    recent_events = np.minimum(events, window)
    overall = (np.asarray(clicks, np.float64) + strength * prior) / (events + strength)
    recent = (np.asarray(recent_clicks, np.float64) + recent_strength * prior) / (recent_events + recent_strength)
    return overall, recent


def add_negative_history(logs: pd.DataFrame, length: int, schema: FeatureSchema,
                         sources: pd.DataFrame | None = None) -> pd.DataFrame:
    """A copy of `logs` with a `negative_history` column: per row, a tuple of `length` ad ids of the
    user's latest non-clicked events among `sources` (default: `logs` itself) strictly before it, most
    recent first, padded with "" (`features.history.build_histories` on the complementary label)."""
    from features.history import build_histories

    sources = logs if sources is None else sources
    flipped = sources.assign(**{schema.click: (sources[schema.click] <= 0).astype(np.float32)})
    out = logs.copy()
    out[NEGATIVE_HISTORY] = list(map(tuple, build_histories(logs, flipped, length, "before", schema)))
    return out
