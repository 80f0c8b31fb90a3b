"""Input pipelines: which columns each model reads, and the tf.data datasets of training rows."""

from __future__ import annotations

import pandas as pd

from features.dataset import make_dataset
from features.schema import FeatureSchema
from serving.contract import HISTORY, NEGATIVE_HISTORY, RETRIEVAL, USER_STATS, signature_inputs
from trainer.config import JobConfig, RankingConfig


def ranking_labels(schema: FeatureSchema, rows: pd.DataFrame | None = None) -> dict[str, bool]:
    """Which optional ranking columns the data has: a position (position tower) and conversions (CVR)."""
    def has(name):
        return bool(name) and (rows is None or name in rows.columns)
    return {"position": has(schema.position), "conversion": has(schema.conversion)}


def query_inputs(schema: FeatureSchema, history_length: int) -> tuple[str, ...]:
    """The retrieval query tower's inputs (and the retrieval/recommender signatures' inputs)."""
    return signature_inputs(RETRIEVAL, tuple(schema.query_features), history=bool(history_length))


def ranking_user_inputs(cfg: RankingConfig) -> tuple[str, ...]:
    """What the ranking model reads about the user's past besides the query features."""
    return (*((HISTORY,) if cfg.history else ()), *((NEGATIVE_HISTORY,) if cfg.negative_history else ()),
            *(USER_STATS if cfg.user_stats else ()))


def retrieval_dataset(rows: pd.DataFrame, cfg: JobConfig, schema, shuffle: bool = True):
    positives = rows[rows[schema.click] > 0]
    ds = make_dataset(positives, (*query_inputs(schema, cfg.retrieval.history_length), *schema.ad_string_features),
                      cfg.retrieval.batch_size, shuffle=shuffle, seed=cfg.training.seed, schema=schema)
    return ds, len(positives)


def ranking_dataset(rows: pd.DataFrame, cfg: JobConfig, schema, shuffle: bool = True):
    has = ranking_labels(schema, rows)
    extra = tuple(getattr(schema, name) for name in ("position", "conversion") if has[name])
    names = (*schema.query_features, *ranking_user_inputs(cfg.ranking), *schema.ad_string_features)
    return make_dataset(rows, (*names, schema.click, *extra),
                        cfg.ranking.batch_size, shuffle=shuffle, seed=cfg.training.seed, schema=schema)
