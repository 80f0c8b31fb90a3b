"""Splits by time, so the model is judged on interactions that happen after its training data."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from features.schema import DEFAULT_SCHEMA, FeatureSchema


@dataclass
class DataSplit:
    train: pd.DataFrame
    test: pd.DataFrame
    cutoff: int

    def cold_ad_ids(self, schema: FeatureSchema = DEFAULT_SCHEMA) -> set[str]:
        """Ads that appear in evaluation but never in training."""
        return set(self.test[schema.ad_id]) - set(self.train[schema.ad_id])


def time_split(logs: pd.DataFrame, test_fraction: float = 0.2,
               schema: FeatureSchema = DEFAULT_SCHEMA) -> DataSplit:
    """Train on the earliest (1 - test_fraction) of the log by timestamp, test on the rest.

    Rows sharing the cutoff timestamp all go to the test side, so no timestamp straddles.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if logs.empty:
        raise ValueError("cannot split an empty log")
    ts = logs[schema.timestamp]
    cutoff = int(ts.quantile(1.0 - test_fraction, interpolation="higher"))
    is_test = ts >= cutoff
    return DataSplit(train=logs[~is_test].reset_index(drop=True),
                     test=logs[is_test].reset_index(drop=True), cutoff=cutoff)


def cold_start_test(split: DataSplit, schema: FeatureSchema = DEFAULT_SCHEMA) -> pd.DataFrame:
    """The cold-start evaluation set: held-out rows whose ad never appears in training."""
    cold = split.test[schema.ad_id].isin(split.cold_ad_ids(schema))
    return split.test[cold].reset_index(drop=True)
