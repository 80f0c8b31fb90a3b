"""Vocabularies of categorical values, built from training rows only."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from features.schema import DEFAULT_SCHEMA, FeatureSchema


@dataclass
class Vocabularies:
    """Per feature, the known values ordered by training frequency (ties by value)."""

    values: dict[str, list] = field(default_factory=dict)

    def __getitem__(self, name: str) -> list:
        return self.values[name]

    def size(self, name: str) -> int:
        return len(self.values[name])

    def to_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.values.items()}

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> Vocabularies:
        return cls(values={k: list(v) for k, v in d.items()})


def _ordered_values(column: pd.Series, min_count: int) -> list:
    counts = column.value_counts()
    counts = counts[counts >= min_count]
    frame = pd.DataFrame({"value": counts.index, "count": counts.to_numpy()})
    frame = frame.sort_values(["count", "value"], ascending=[False, True])
    values = frame["value"].tolist()
    if pd.api.types.is_integer_dtype(column):
        return [int(v) for v in values]
    return [str(v) for v in values]


def build_vocabularies(train_logs: pd.DataFrame, catalog: pd.DataFrame,
                       schema: FeatureSchema = DEFAULT_SCHEMA,
                       min_count: int = 1) -> Vocabularies:
    """Query vocabularies come from training logs; ad vocabularies from ads seen in them.

    Ads that only appear later (cold start) stay out of the id vocabulary, so the model
    must rely on their text and categoricals.
    """
    values: dict[str, list] = {}
    for name in schema.query_features:
        values[name] = _ordered_values(train_logs[name], min_count)
    seen = catalog[catalog[schema.ad_id].isin(set(train_logs[schema.ad_id]))]
    values[schema.ad_id] = _ordered_values(
        train_logs[schema.ad_id][train_logs[schema.ad_id].isin(set(seen[schema.ad_id]))],
        min_count)
    for name in schema.ad_categoricals:
        values[name] = _ordered_values(seen[name], 1)
    return Vocabularies(values=values)
