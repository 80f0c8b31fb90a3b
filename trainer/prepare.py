"""Data preparation for a job: load the logs and catalog, window them, split by time, join ad columns."""

from __future__ import annotations

import pandas as pd

from features.history import add_history
from features.schema import DEFAULT_SCHEMA, FeatureSchema
from features.split import DataSplit, time_split
from features.synthetic import generate_world
from features.user_stats import add_negative_history, add_user_stats
from features.vocab import Vocabularies, build_vocabularies
from trainer.config import JobConfig
from trainer.progress import log


class DataError(ValueError):
    """Training data does not fit together (e.g. a logged ad missing from the catalog)."""


def load_data(cfg: JobConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    if cfg.data.source != "synthetic":
        raise DataError(f"data.source {cfg.data.source!r} is not known; use 'synthetic' or 'spec'")
    world = generate_world(cfg.data.synthetic)
    return world.catalog, world.logs


def load_job_data(cfg: JobConfig, schema: FeatureSchema | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, FeatureSchema]:
    """Catalog, logs and their schema: the synthetic world, or real logs through a data spec.

    With `data.source: spec` the schema is the spec's (its columns, possibly no context); the
    spec's validation report is printed, and a `fail` policy raises DataValidationError.
    """
    if cfg.data.source != "spec":
        catalog, logs = load_data(cfg)
        return catalog, logs, schema or DEFAULT_SCHEMA
    if not cfg.data.spec:
        raise DataError("data.source is 'spec' but data.spec names no spec file")
    from features.loader import load_dataset
    from features.spec import load_spec

    loaded = load_dataset(load_spec(cfg.data.spec, root=cfg.data.root or None))
    log("data validation:\n" + loaded.report.format())
    return loaded.catalog, loaded.logs, loaded.schema


def join_ad_features(logs: pd.DataFrame, catalog: pd.DataFrame, schema: FeatureSchema) -> pd.DataFrame:
    """Attach the catalog's ad columns to each log row; every logged ad must be in the catalog."""
    unknown = ~logs[schema.ad_id].isin(set(catalog[schema.ad_id]))
    if unknown.any():
        first = logs.index[unknown][0]
        raise DataError(f"{int(unknown.sum())} log rows name ads missing from the catalog "
                        f"(first at row {first}: {logs.at[first, schema.ad_id]!r})")
    cols = [c for c in schema.ad_string_features if c != schema.ad_id]
    return logs.drop(columns=[c for c in cols if c in logs.columns]).merge(
        catalog[[schema.ad_id, *cols]], on=schema.ad_id, how="left", validate="many_to_one")


def sampling_counts(rows: pd.DataFrame, schema: FeatureSchema) -> dict[str, float]:
    """Training positives per ad id: the in-batch sampling frequencies logQ correction uses."""
    counts = rows.loc[rows[schema.click] > 0, schema.ad_id].astype(str).value_counts()
    return {k: float(v) for k, v in counts.items()}


def select_time_window(logs: pd.DataFrame, window: tuple[float, ...], schema: FeatureSchema) -> pd.DataFrame:
    """Rows whose timestamp falls in [start, end) of the log's time span, as fractions."""
    if len(window) != 2 or not 0.0 <= window[0] < window[1] <= 1.0:
        raise DataError(f"data.time_window must be [start, end] with 0 <= start < end <= 1, got {list(window)}")
    if tuple(window) == (0.0, 1.0):
        return logs
    ts = logs[schema.timestamp]
    lo, hi = ts.min(), ts.max()
    start, end = lo + window[0] * (hi - lo), lo + window[1] * (hi - lo)
    keep = (ts >= start) & ((ts < end) if window[1] < 1.0 else (ts <= end))
    return logs[keep].reset_index(drop=True)


def prepare_data(cfg: JobConfig, schema: FeatureSchema | None = None,
                 vocabularies: Vocabularies | None = None):
    """Load, window and time-split the job's data; vocabularies from training rows unless given.

    Returns (catalog, schema, split with catalog ad columns joined, vocabularies).
    """
    catalog, logs, schema = load_job_data(cfg, schema)
    if cfg.retrieval.history_length:  # per event, from earlier events only: before the window and the split,
        logs = add_history(logs, cfg.retrieval.history_length, schema)  # as a serving system would know them
    if cfg.ranking.negative_history:  # the same rule: earlier events only, before the window and the split
        logs = add_negative_history(logs, cfg.retrieval.history_length, schema)
    if cfg.ranking.user_stats:
        logs = add_user_stats(logs, cfg.ranking.recent_window, schema)
    logs = select_time_window(logs, cfg.data.time_window, schema)
    split = time_split(logs, cfg.training.test_fraction, schema)
    if vocabularies is None:
        vocabularies = build_vocabularies(split.train, catalog, schema)
    split = DataSplit(train=join_ad_features(split.train, catalog, schema),
                      test=join_ad_features(split.test, catalog, schema), cutoff=split.cutoff)
    return catalog, schema, split, vocabularies
