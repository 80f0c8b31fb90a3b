"""Evaluation protocols: which rows train and which are held out.

- `time`: a global cutoff; the last `test_fraction` of rows by time are held out (exactly that many
  rows: rows sharing the cutoff second are ordered by their position in the log);
- `random`: a seeded random `test_fraction` of rows (the TensorFlow Recommenders tutorial's protocol);
- `leave_last_out`: each user's last `n` positives by time, and any of their rows after them, are held
  out (the sequential-recommendation protocol); users with no more than `n` positives stay in training;
- `column`: a column of the log names each row's side (e.g. a split shipped with a data set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.schema import DEFAULT_SCHEMA, FeatureSchema


@dataclass
class DataSplit:
    train: pd.DataFrame
    test: pd.DataFrame
    cutoff: int | None = None  # `time`: the first held-out timestamp
    protocol: str = "time"

    def cold_ad_ids(self, schema: FeatureSchema = DEFAULT_SCHEMA) -> set[str]:
        """Ads that appear in evaluation but never in training."""
        return set(self.test[schema.ad_id]) - set(self.train[schema.ad_id])

    def with_frames(self, train: pd.DataFrame, test: pd.DataFrame) -> DataSplit:
        return DataSplit(train=train, test=test, cutoff=self.cutoff, protocol=self.protocol)


def _check(logs: pd.DataFrame, test_fraction: float | None = None) -> None:
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if logs.empty:
        raise ValueError("cannot split an empty log")


def _by_mask(logs: pd.DataFrame, is_test: np.ndarray, protocol: str, cutoff: int | None = None) -> DataSplit:
    return DataSplit(train=logs[~is_test].reset_index(drop=True), test=logs[is_test].reset_index(drop=True),
                     cutoff=cutoff, protocol=protocol)


def held_out_count(n_rows: int, test_fraction: float) -> int:
    """round(n * fraction) rows, at least one on each side."""
    if n_rows < 2:
        raise ValueError(f"cannot hold out rows of a log with {n_rows} row(s)")
    return int(min(max(round(n_rows * test_fraction), 1), n_rows - 1))


def time_split(logs: pd.DataFrame, test_fraction: float = 0.2,
               schema: FeatureSchema = DEFAULT_SCHEMA) -> DataSplit:
    """Train on the earliest rows by timestamp, test on the last `round(n * test_fraction)`."""
    _check(logs, test_fraction)
    n_test = held_out_count(len(logs), test_fraction)
    order = np.lexsort((np.arange(len(logs)), logs[schema.timestamp].to_numpy()))
    is_test = np.zeros(len(logs), bool)
    is_test[order[len(logs) - n_test:]] = True
    cutoff = int(logs[schema.timestamp].to_numpy()[order[len(logs) - n_test]])
    return _by_mask(logs, is_test, "time", cutoff)


def random_split(logs: pd.DataFrame, test_fraction: float = 0.2, seed: int = 42) -> DataSplit:
    """A seeded random `round(n * test_fraction)` rows held out, whatever their time."""
    _check(logs, test_fraction)
    n_test = held_out_count(len(logs), test_fraction)
    is_test = np.zeros(len(logs), bool)
    is_test[np.random.default_rng(seed).permutation(len(logs))[:n_test]] = True
    return _by_mask(logs, is_test, "random")


def leave_last_out_split(logs: pd.DataFrame, n_last: int = 1, schema: FeatureSchema = DEFAULT_SCHEMA) -> DataSplit:
    """Each user's last `n_last` positives (by time, then log order) and their rows after them held out.

    A user with `n_last` positives or fewer keeps every row in training: a query needs a history.
    """
    _check(logs)
    if n_last < 1:
        raise ValueError(f"leave_last_out needs n_last >= 1, got {n_last}")
    n = len(logs)
    users = pd.factorize(logs[schema.user_id].astype(str))[0]
    order = np.lexsort((np.arange(n), logs[schema.timestamp].to_numpy(), users))
    sorted_users = users[order]
    positive = logs[schema.click].to_numpy()[order] > 0
    # Positives at or after each row, within its user (rows sorted by user, then time).
    remaining = pd.Series(positive[::-1].astype(np.int64)).groupby(sorted_users[::-1]).cumsum().to_numpy()[::-1]
    # The n-th last positive has `remaining == n_last`; rows after it have fewer remaining.
    in_tail = (remaining < n_last) | ((remaining == n_last) & positive)
    user_positives = np.bincount(sorted_users, weights=positive, minlength=sorted_users.max() + 1)
    in_tail &= user_positives[sorted_users] > n_last
    is_test = np.zeros(n, bool)
    is_test[order[in_tail]] = True
    return _by_mask(logs, is_test, "leave_last_out")


def column_split(logs: pd.DataFrame, column: str, test_values: tuple[str, ...] = ("test",)) -> DataSplit:
    """Rows whose `column` holds one of `test_values` are held out."""
    _check(logs)
    if column not in logs.columns:
        raise ValueError(f"split column {column!r} is not in the log (columns: {list(logs.columns)})")
    is_test = logs[column].astype(str).isin({str(v) for v in test_values}).to_numpy()
    if is_test.all() or not is_test.any():
        raise ValueError(f"split column {column!r}: values {list(test_values)} mark "
                         f"{int(is_test.sum())} of {len(logs)} rows; both sides need rows")
    return _by_mask(logs, is_test, "column")


def cold_start_test(split: DataSplit, schema: FeatureSchema = DEFAULT_SCHEMA) -> pd.DataFrame:
    """The cold-start evaluation set: held-out rows whose ad never appears in training."""
    cold = split.test[schema.ad_id].isin(split.cold_ad_ids(schema))
    return split.test[cold].reset_index(drop=True)
