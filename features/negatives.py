"""Sampled negatives for logs that hold none (implicit feedback: every row is a positive).

Per positive row, `per_positive` ads are drawn uniformly (with replacement) from a candidate pool,
never one the row's user has a positive with (`exclude`). A negative copies its positive's query
side (user and context columns, history, timestamp, position), takes the drawn ad's catalog
columns, and is labelled click = 0 (conversion = 0) with `SAMPLED_NEGATIVE` True. Negatives follow
their positive in row order, so a split by time or a shuffle buffer sees them together.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.schema import FeatureSchema

SAMPLED_NEGATIVE = "sampled_negative"  # the column marking sampled rows (False on logged rows)
MAX_REDRAWS = 100  # rounds of redrawing excluded draws; what is still excluded after them is dropped


def _pair_keys(users: np.ndarray, ads: np.ndarray, n_ads: int) -> np.ndarray:
    return users.astype(np.int64) * n_ads + ads.astype(np.int64)


def draw_negative_ads(users: pd.Series, candidates: np.ndarray, exclude: pd.DataFrame, per_positive: int,
                      schema: FeatureSchema, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `candidates` [len(users), per_positive] and a mask of the draws that are kept.

    A draw the user has a positive with is redrawn (rejection sampling keeps the draw uniform over
    the allowed ads); a user with no allowed candidate at all gets no negatives.
    """
    ad_code = {a: i for i, a in enumerate(candidates)}
    user_index = pd.Index(pd.unique(pd.concat([users, exclude[schema.user_id]], ignore_index=True).astype(str)))
    codes = user_index.get_indexer(users.astype(str))
    ex_ads = exclude[schema.ad_id].astype(str).map(ad_code)
    known = ex_ads.notna().to_numpy()
    excluded = np.unique(_pair_keys(user_index.get_indexer(exclude[schema.user_id].astype(str))[known],
                                    ex_ads[known].to_numpy(np.int64), len(candidates)))
    draws = rng.integers(0, len(candidates), size=(len(users), per_positive))
    bad = np.isin(_pair_keys(codes[:, None], draws, len(candidates)), excluded)
    for _ in range(MAX_REDRAWS):
        if not bad.any():
            break
        draws[bad] = rng.integers(0, len(candidates), size=int(bad.sum()))
        bad = np.isin(_pair_keys(codes[:, None], draws, len(candidates)), excluded)
    return draws, ~bad


def sample_negatives(rows: pd.DataFrame, catalog: pd.DataFrame, schema: FeatureSchema, per_positive: int,
                     candidates, exclude: pd.DataFrame, seed: int) -> pd.DataFrame:
    """`rows` (marked `SAMPLED_NEGATIVE` False) with `per_positive` sampled negatives after each positive.

    `candidates`: the ad ids to draw from; `exclude`: (user_id, ad_id) positives a user's
    negatives must avoid. Catalog columns present in `rows` (ad categoricals, text, bid) are taken
    from `catalog` for the drawn ads. Deterministic for a given `seed`.
    """
    candidates = np.asarray(sorted({str(a) for a in candidates}), dtype=object)
    rows = rows.reset_index(drop=True).assign(**{SAMPLED_NEGATIVE: False})
    positive = np.flatnonzero(rows[schema.click].to_numpy() > 0)
    if per_positive < 1 or len(candidates) == 0 or len(positive) == 0:
        return rows
    rng = np.random.default_rng(seed)
    draws, keep = draw_negative_ads(rows[schema.user_id].iloc[positive], candidates, exclude, per_positive,
                                    schema, rng)
    source = np.repeat(positive, per_positive)[keep.ravel()]
    negatives = rows.iloc[source].copy()
    negatives[schema.ad_id] = candidates[draws.ravel()[keep.ravel()]]
    by_ad = catalog.assign(**{schema.ad_id: catalog[schema.ad_id].astype(str)}).set_index(schema.ad_id)
    for col in rows.columns.intersection(by_ad.columns):
        negatives[col] = negatives[schema.ad_id].map(by_ad[col]).to_numpy()
    negatives[schema.click] = np.zeros(len(negatives), rows[schema.click].dtype)
    if schema.conversion and schema.conversion in rows:
        negatives[schema.conversion] = np.zeros(len(negatives), rows[schema.conversion].dtype)
    if "rating" in rows:  # a rating data set with no rating below its threshold: a sampled row has none
        negatives["rating"] = np.nan
    negatives[SAMPLED_NEGATIVE] = True
    # Row order: each positive, then its negatives (a stable sort on the source row, logged rows first).
    order = np.concatenate([np.arange(len(rows)) * 2, source * 2 + 1])
    out = pd.concat([rows, negatives], ignore_index=True)
    return out.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)
