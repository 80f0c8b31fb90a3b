"""Vocabularies of categorical values, built from training rows only."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from features.schema import DEFAULT_SCHEMA, FeatureSchema

HASHED_KEY = "__hash_buckets__"  # in `to_dict`: the hashed features and their bucket counts


@dataclass
class Vocabularies:
    """Per feature, the known values ordered by training frequency (ties by value).

    `hashed`: features looked up by hash into a fixed number of buckets instead (an unbounded id space,
    `data.stream.hash_buckets`); their `values` are empty."""

    values: dict[str, list] = field(default_factory=dict)
    hashed: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> list:
        return self.values[name]

    def size(self, name: str) -> int:
        return len(self.values[name])

    def to_dict(self) -> dict[str, list]:
        out: dict = {k: list(v) for k, v in self.values.items()}
        if self.hashed:
            out[HASHED_KEY] = dict(self.hashed)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> Vocabularies:
        hashed = {k: int(v) for k, v in dict(d.get(HASHED_KEY, {})).items()}
        return cls(values={k: list(v) for k, v in d.items() if k != HASHED_KEY}, hashed=hashed)


def _ordered_values(column: pd.Series, min_count: int) -> list:
    return ordered_by_count(column.value_counts(), min_count, pd.api.types.is_integer_dtype(column))


def ordered_by_count(counts: pd.Series, min_count: int, integer: bool) -> list:
    """Values (the index) with at least `min_count`, by count descending, ties by value."""
    counts = counts[counts >= min_count]
    frame = pd.DataFrame({"value": counts.index, "count": counts.to_numpy()})
    frame = frame.sort_values(["count", "value"], ascending=[False, True])
    values = frame["value"].tolist()
    if integer:
        return [int(v) for v in values]
    return [str(v) for v in values]


def _common_user_values(train_logs: pd.DataFrame, name: str, schema: FeatureSchema, k: int) -> pd.Series:
    """The rows of user categorical `name` whose value at least `k` distinct users hold: a value
    fewer people share points at them however many rows they have."""
    column = train_logs[name]
    holders = train_logs.groupby(name, sort=False)[schema.user_id].nunique()
    return column[column.isin(set(holders.index[holders >= k]))]


def build_vocabularies(train_logs: pd.DataFrame, catalog: pd.DataFrame,
                       schema: FeatureSchema = DEFAULT_SCHEMA,
                       min_count: int = 1, user_min_count: int = 1) -> Vocabularies:
    """Query vocabularies come from training logs; ad vocabularies from ads seen in them.

    Ads that only appear later (cold start) stay out of the id vocabulary, so the model
    must rely on their text and categoricals. `user_min_count` (`privacy.min_count`) minimises
    what the models keep about people: a user id with fewer training rows, and a user
    categorical value held by fewer distinct users, stay out and are looked up as OOV.
    """
    values: dict[str, list] = {}
    for name in schema.query_features:
        column = train_logs[name]
        if user_min_count > 1 and name in schema.user_categoricals:
            column = _common_user_values(train_logs, name, schema, user_min_count)
        counted = max(min_count, user_min_count) if name == schema.user_id else min_count
        values[name] = _ordered_values(column, counted)
    seen = catalog[catalog[schema.ad_id].isin(set(train_logs[schema.ad_id]))]
    values[schema.ad_id] = _ordered_values(
        train_logs[schema.ad_id][train_logs[schema.ad_id].isin(set(seen[schema.ad_id]))],
        min_count)
    for name in schema.ad_categoricals:
        values[name] = _ordered_values(seen[name], 1)
    return Vocabularies(values=values)
