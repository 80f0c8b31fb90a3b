"""Vocabularies and training statistics from one streaming pass over the logs (`features.stream`).

The pass is also the validation pass: it reads every file once, so the stream's report ends with
the rows read, kept and skipped per reason (and a `fail` policy stops it at the first problem). Memory
is bounded by the distinct values, not the rows: a count per distinct value of each vocabulary
feature, and for `privacy.min_count` on a user categorical at most `k` user ids per value. A feature
in `hashed` is not counted at all (an unbounded id space: its ids are hashed into buckets).

The vocabularies equal `build_vocabularies` over the same rows: values by count descending, ties by
value; ad ids those of the logs (all in the catalog, `unknown_ad`); ad categoricals from the catalog
rows of the ads seen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from features.loader import check_skipped
from features.schema import FeatureSchema
from features.stream import LogStream
from features.vocab import Vocabularies, ordered_by_count


@dataclass
class StreamCounts:
    """What the pass saw: rows and clicks, counts per value, positives per ad, rows per file."""

    rows: int = 0
    clicks: float = 0.0
    values: dict[str, Counter] = field(default_factory=dict)
    holders: dict[str, dict[str, set]] = field(default_factory=dict)  # user categorical value -> <= k users
    positives: Counter = field(default_factory=Counter)  # training positives per ad id (logQ correction)
    file_rows: dict[str, int] = field(default_factory=dict)

    @property
    def click_rate(self) -> float:
        return self.clicks / self.rows if self.rows else 0.5

    @property
    def positive_rows(self) -> int:
        return int(sum(self.positives.values()))


def count_pass(stream: LogStream, schema: FeatureSchema, hashed: frozenset[str] = frozenset(),
               user_min_count: int = 1, on_chunk: Callable[[str, int], None] | None = None) -> StreamCounts:
    """Read every log file once, validating and counting; fails like `load_dataset` when more than
    `max_skipped_fraction` of the rows were skipped."""
    counts = StreamCounts()
    counted = [n for n in (*schema.query_features, schema.ad_id) if n not in hashed]
    counts.values = {n: Counter() for n in counted}
    holders = [n for n in schema.user_categoricals if n not in hashed] if user_min_count > 1 else []
    counts.holders = {n: {} for n in holders}
    for path in stream.files:
        rows = 0
        for frame in stream.frames(path):
            rows += len(frame)
            _count(counts, frame, schema, counted, holders, user_min_count)
            if on_chunk is not None:
                on_chunk(str(path), len(frame))
        counts.file_rows[str(path)] = rows
    check_skipped(stream.spec, stream.report)
    return counts


def _count(counts: StreamCounts, frame: pd.DataFrame, schema: FeatureSchema, counted, holders, k: int) -> None:
    counts.rows += len(frame)
    counts.clicks += float(frame[schema.click].sum())
    for name in counted:
        counts.values[name].update(frame[name].value_counts().to_dict())
    counts.positives.update(frame.loc[frame[schema.click] > 0, schema.ad_id].astype(str).value_counts().to_dict())
    for name in holders:
        seen = counts.holders[name]
        for value, users in frame.groupby(name, sort=False)[schema.user_id].unique().items():
            held = seen.setdefault(value, set())
            for user in users:  # k distinct users are enough to keep the value: no more are held
                if len(held) >= k:
                    break
                held.add(user)


def stream_vocabularies(counts: StreamCounts, catalog: pd.DataFrame, schema: FeatureSchema,
                        hash_buckets: dict[str, int] | None = None, min_count: int = 1,
                        user_min_count: int = 1) -> Vocabularies:
    """The vocabularies `build_vocabularies` would build from the counted rows; hashed features have none."""
    hash_buckets = dict(hash_buckets or {})
    values: dict[str, list] = {}
    for name in schema.query_features:
        if name in hash_buckets:
            values[name] = []
            continue
        series = pd.Series(counts.values[name], dtype="int64")
        if user_min_count > 1 and name in counts.holders:
            common = {v for v, users in counts.holders[name].items() if len(users) >= user_min_count}
            series = series[series.index.isin(common)]
        threshold = max(min_count, user_min_count) if name == schema.user_id else min_count
        values[name] = ordered_by_count(series, threshold, schema.is_int_feature(name))
    ads = pd.Series(counts.values[schema.ad_id], dtype="int64")
    ads.index = ads.index.astype(str)
    values[schema.ad_id] = ordered_by_count(ads, min_count, False)
    seen = catalog[catalog[schema.ad_id].astype(str).isin(set(ads.index))]
    for name in schema.ad_categoricals:
        values[name] = ordered_by_count(seen[name].value_counts(), 1, pd.api.types.is_integer_dtype(seen[name]))
    return Vocabularies(values=values, hashed=hash_buckets)
