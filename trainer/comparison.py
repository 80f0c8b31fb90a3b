"""The model and the retrieval baselines, side by side on one query set.

Every method learns from the same `Interactions` (the training positives), answers the same `Queries`
(each held-out positive with the history and the exclusions its protocol allows) and is ranked by the
same rule (`trainer.baselines.base.rank_queries`: exclusions applied, ties broken by training
popularity, then pessimistically). Baselines choose their hyperparameters on the validation split the
model early-stops on, never on the test rows.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from features.history import HISTORY, history_matrix
from features.interactions import PAD_ROW, Interactions, Queries, exclusion_lists
from features.schema import FeatureSchema
from trainer.baselines.base import Scorer, rank_queries
from trainer.metrics import mrr, per_user_metrics, retrieval_metrics
from trainer.progress import log, step


def catalog_rows(catalog: pd.DataFrame, schema: FeatureSchema) -> dict[str, int]:
    return {str(a): i for i, a in enumerate(catalog[schema.ad_id].astype(str))}


def interactions_of(rows: pd.DataFrame, catalog: pd.DataFrame, schema: FeatureSchema) -> Interactions:
    """The positives of `rows` as integer codes (users in sorted id order, items as catalog rows)."""
    positives = rows[rows[schema.click] > 0]
    user_ids = sorted(positives[schema.user_id].astype(str).unique())
    code = {u: i for i, u in enumerate(user_ids)}
    row_of = catalog_rows(catalog, schema)
    return Interactions(users=positives[schema.user_id].astype(str).map(code).to_numpy(),
                        items=positives[schema.ad_id].astype(str).map(row_of).to_numpy(),
                        timestamps=positives[schema.timestamp].to_numpy(), n_users=len(user_ids),
                        n_items=len(catalog), user_ids=user_ids,
                        item_ids=catalog[schema.ad_id].astype(str).tolist())


def queries_of(rows: pd.DataFrame, excluded: list[np.ndarray], catalog: pd.DataFrame, train: Interactions,
               schema: FeatureSchema) -> Queries:
    """One query per positive of `rows` (which carry their `history` column); `excluded[i]`: the ad ids
    row i may not be shown. Ads outside the catalog in a history or an exclusion list are dropped."""
    positive = rows[schema.click].to_numpy() > 0
    frame = rows[positive].reset_index(drop=True)
    kept = [e for e, p in zip(excluded, positive, strict=True) if p] if len(excluded) else [[]] * len(frame)
    row_of = catalog_rows(catalog, schema)
    code = {u: i for i, u in enumerate(train.user_ids)}
    if HISTORY in frame and len(frame):
        names = history_matrix(frame[HISTORY])
        history = np.vectorize(lambda a: row_of.get(a, PAD_ROW), otypes=[np.int32])(names)
        # A history ad missing from the catalog leaves a gap: close it so entries stay most recent first.
        order = np.argsort(history == PAD_ROW, axis=1, kind="stable")
        history = np.take_along_axis(history, order, axis=1)
    else:
        history = np.full((len(frame), 0), PAD_ROW, np.int32)
    indptr, items = exclusion_lists([np.array([row_of[a] for a in map(str, e) if a in row_of], np.int32)
                                     for e in kept])
    return Queries(history=history, users=frame[schema.user_id].astype(str).map(code).fillna(-1).to_numpy(),
                   targets=frame[schema.ad_id].astype(str).map(row_of).to_numpy(), exclude_indptr=indptr,
                   exclude_items=items, frame=frame)


class TwoTowerScorer(Scorer):
    """A trained retrieval model as a `Scorer`: query embeddings of the query rows' features (history
    included) against the catalog's ad embeddings. It was trained by the job, so `fit` does nothing."""

    name = "two-tower"

    def __init__(self, model, catalog: pd.DataFrame, schema: FeatureSchema):
        super().__init__()
        from trainer.evaluate import ad_embeddings

        self.model, self.schema = model, schema
        self.ads = ad_embeddings(model, catalog, schema)

    def fit(self, train: Interactions, validation: Queries | None = None) -> None:
        return None

    def score(self, queries: Queries, start: int, stop: int) -> np.ndarray:
        from trainer.evaluate import query_embeddings

        return query_embeddings(self.model, queries.frame.iloc[start:stop], self.schema) @ self.ads.T


def baseline_class(name: str):
    from trainer import baselines

    return {"most_popular": baselines.MostPopular, "itemknn": baselines.ItemKNN, "ease": baselines.EASE,
            "id_only": baselines.IdOnlyScorer, "sasrec": baselines.SASRec}[name]


def fit_baselines(names: tuple[str, ...], train: Interactions, fit_train: Interactions | None = None,
                  validation: Queries | None = None, refit: bool = True) -> tuple[dict[str, Scorer], dict]:
    """Fit each named baseline. With a validation split: hyperparameters chosen on it (each fitted on
    `fit_train`), then refitted on `train` when `refit`; without one: default hyperparameters on `train`.
    Returns the fitted scorers and, per baseline, its selection report (or why it was skipped)."""
    from trainer.baselines import EASETooLarge, select_and_fit

    popularity = (fit_train or train).item_counts()
    scorers, reports = {}, {}
    for name in names:
        cls = baseline_class(name)
        started = time.time()
        try:
            if validation is not None and fit_train is not None:
                scorer, report = select_and_fit(cls, fit_train, validation, train if refit else fit_train,
                                                popularity)
            else:
                scorer, report = cls(), {"params": {}, "selected_on": None}
                scorer.fit(train)
        except EASETooLarge as err:  # a catalog and a user base both too large for the closed form
            log(f"baseline {name}: skipped: {err}")
            reports[name] = {"skipped": str(err)}
            continue
        report["fit_seconds"] = round(time.time() - started, 1)
        log(f"baseline {name}: fitted in {report['fit_seconds']:.1f}s")
        scorers[name], reports[name] = scorer, report
    return scorers, reports


def compare(scorers: dict[str, Scorer], queries: Queries, popularity: np.ndarray, slices: dict[str, np.ndarray],
            ks: tuple[int, ...], users: np.ndarray | None = None) -> dict:
    """Ranks of every method on `queries`; metrics overall and on each slice (a boolean mask per query).
    With `users` (one per query) also the per-user metrics (`per_user_metrics`)."""
    out = {}
    for name, scorer in scorers.items():
        started = time.time()
        ranks = rank_queries(scorer, queries, popularity)
        out[name] = metrics_of(ranks, ks, users)
        out[name]["score_seconds"] = round(time.time() - started, 1)
        for slice_name, mask in slices.items():
            out[f"{name}_{slice_name}"] = metrics_of(ranks[mask], ks, None if users is None else users[mask])
    return out


def metrics_of(ranks: np.ndarray, ks: tuple[int, ...], users: np.ndarray | None = None) -> dict:
    """Recall@K and NDCG@K at every K (and 10, the head of the list), and MRR, of one target per query;
    with `users` (one per query) also the per-user Recall@K and NDCG@K (`per_user_metrics`)."""
    ks = tuple(sorted({*ks, 10}))
    per_user = per_user_metrics(ranks, users, ks) if users is not None else {}
    return {**retrieval_metrics(ranks, ks), "mrr": mrr(ranks), "queries": int(len(ranks)), **per_user}


@step("evaluating retrieval over the catalog")
def evaluate_retrieval(model, catalog: pd.DataFrame, schema: FeatureSchema, train_rows: pd.DataFrame,
                       test_rows: pd.DataFrame, excluded: list[np.ndarray], ks: tuple[int, ...],
                       baselines: dict[str, Scorer] | None = None, per_user: bool = False) -> dict:
    """Recall@K, NDCG@K and MRR of the held-out positives over the whole catalog, for the model and each
    fitted baseline, overall and on warm / cold-start ads and seen / unseen users; with `per_user` (for
    protocols where `one_list_per_user` holds) also the per-user Recall@K and NDCG@K.

    Each held-out positive is one query (its user, context and history) with one relevant ad; an ad its
    exclusions remove ranks nowhere, and an excluded target counts as a miss. Most-popular is always
    included (it needs no fitting).
    """
    from trainer.baselines import MostPopular

    train = interactions_of(train_rows, catalog, schema)
    queries = queries_of(test_rows, excluded, catalog, train, schema)
    popularity = train.item_counts()
    scorers: dict[str, Scorer] = {"model": TwoTowerScorer(model, catalog, schema)}
    most_popular = MostPopular()
    most_popular.fit(train)
    scorers.update({"most_popular": most_popular, **(baselines or {})})
    cold = queries.frame[schema.ad_id].astype(str).isin(set(test_rows[schema.ad_id].astype(str))
                                                         - set(train_rows[schema.ad_id].astype(str))).to_numpy()
    unseen = ~queries.frame[schema.user_id].astype(str).isin(set(train_rows[schema.user_id].astype(str))).to_numpy()
    out = {"test_positives": int(len(queries)), "cold_test_positives": int(cold.sum()),
           "unseen_user_test_positives": int(unseen.sum()), "catalog_size": int(len(catalog)),
           "test_positives_with_history": int((queries.history_lengths() > 0).sum()),
           "excluded_targets": int(sum(t in set(queries.excluded(i)) for i, t in enumerate(queries.targets)))}
    slices = {"warm": ~cold, "cold": cold, "seen_users": ~unseen, "unseen_users": unseen}
    users = queries.frame[schema.user_id].to_numpy() if per_user else None
    out.update(compare(scorers, queries, popularity, slices, ks, users))
    return out


@step("evaluating retrieval on the validation rows")
def model_validation_metrics(model, catalog: pd.DataFrame, schema: FeatureSchema, fit_rows: pd.DataFrame,
                             validation, ks: tuple[int, ...]) -> dict:
    """The model on the validation queries, ranked as the baselines' candidates were (their `select_and_fit`
    reports): what the model's settings can be compared and chosen on without touching the test rows."""
    train = interactions_of(fit_rows, catalog, schema)
    queries = queries_of(validation.split.test, validation.excluded, catalog, train, schema)
    ranks = rank_queries(TwoTowerScorer(model, catalog, schema), queries, train.item_counts())
    return metrics_of(ranks, ks)
