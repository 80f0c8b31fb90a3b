"""The servables' graphs, each a `tf.Module` with one `serve` function, written by `trainer.export`.

- `RetrievalServable`: user + context (+ history) -> top-K ad ids and scores (brute-force or IVF
  index, `export.index`);
- `RankingServable`: user + context + ad -> calibrated pCTR and pCVR, the ad text tokenized and
  encoded inside the graph (TF Text ops);
- `RecommenderServable`: retrieve -> drop excluded ads -> rank -> the best k by the objective.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tensorflow_text  # noqa: F401  (registers the TF Text ops the ranking graph uses)

from features.schema import FeatureSchema
from serving.contract import (
    EXCLUDED_AD_IDS,
    HISTORY,
    PAD_AD_ID,
    USER_STATS,
)
from trainer.builders import TextAssets
from trainer.evaluate import ad_embeddings
from trainer.exclusion import CatalogRows, distinct_known, first_allowed, is_excluded
from trainer.explain import explain, scored_and_explained
from trainer.ivf_index import IvfIndex, IvfLayout, build_layout
from trainer.ranking import RankingModel
from trainer.trained import TrainedModels

OBJECTIVES = ("pctr", "ecpm", "cpa")


class ExportError(RuntimeError):
    """An export failed its checks; nothing was published."""


def _query_specs(schema: FeatureSchema, history_length: int = 0) -> dict[str, tf.TensorSpec]:
    specs = {n: tf.TensorSpec([None], tf.string, name=n) for n in schema.query_string_features}
    specs.update({n: tf.TensorSpec([None], tf.int64, name=n) for n in schema.query_int_features})
    if history_length:  # the user's last N positive ad ids, most recent first, padded with ""
        specs[HISTORY] = tf.TensorSpec([None, history_length], tf.string, name=HISTORY)
    return specs


def _user_specs(ranking: RankingModel) -> dict[str, tf.TensorSpec]:
    """What the ranking model reads about the user's past: `history` / `negative_history` [batch, N]
    (string, padded with "") and the user counters (int64 [batch]), when it reads them."""
    specs = {n: tf.TensorSpec([None, ranking.history_length], tf.string, name=n) for n in ranking.histories}
    if ranking.user_stats is not None:
        specs.update({n: tf.TensorSpec([None], tf.int64, name=n) for n in USER_STATS})
    return specs


def _ad_specs(schema: FeatureSchema) -> dict[str, tf.TensorSpec]:
    names = (*schema.ad_string_features, *schema.ad_text)
    return {n: tf.TensorSpec([None], tf.string, name=n) for n in names}


class BruteForceIndex(tfrs.layers.factorized_top_k.BruteForce):
    """TFRS's brute-force top-K index, with a `get_config`: its query model is a Keras model (saved as
    the index's sublayer, not as configuration), which TFRS's own default config cannot serialize and
    warns about on every save. The candidates are data, set by `index()`."""

    def get_config(self) -> dict:
        return {"name": self.name, "k": int(self._k)}


def ivf_layout(trained: TrainedModels) -> IvfLayout:
    """The IVF partitions of the catalog's ad embeddings (seeded k-means; export.ivf_*)."""
    cfg = trained.config.export
    try:
        return build_layout(ad_embeddings(trained.retrieval, trained.catalog, trained.schema), cfg.ivf_partitions,
                            seed=trained.config.training.seed, iterations=cfg.ivf_iterations)
    except ValueError as err:
        raise ExportError(f"ivf index: {err}") from err


def catalog_index(trained: TrainedModels, identifiers: tf.Tensor, k: int, layout: IvfLayout | None = None):
    """The top-K index over the catalog that export.index names; either answers
    `index(query features, k=...)` -> ([batch, k] scores, [batch, k] identifiers), best first, with
    min(k, catalog size) real ads (the IVF index widens its probe rather than pad). `layout`: IVF
    partitions built once for several servables (else built here)."""
    cfg = trained.config.export
    query_tower = trained.retrieval.query_tower
    embeddings = ad_embeddings(trained.retrieval, trained.catalog, trained.schema)
    if cfg.index == "ivf":
        return IvfIndex(query_tower, embeddings, identifiers, layout or ivf_layout(trained), cfg.nprobe,
                        cfg.ivf_storage)
    index = BruteForceIndex(query_tower, k=k)
    index.index(tf.constant(embeddings), identifiers)
    return index


class RetrievalServable(tf.Module):
    def __init__(self, trained: TrainedModels, k: int, layout: IvfLayout | None = None):
        super().__init__()
        schema = trained.schema
        self.query_tower = trained.retrieval.query_tower
        k = min(k, len(trained.catalog))
        self.index = catalog_index(trained, tf.constant(trained.catalog[schema.ad_id].astype(str).tolist()), k,
                                   layout)
        specs = _query_specs(schema, self.query_tower.history_length)

        @tf.function(input_signature=[specs])
        def serve(features):
            scores, ids = self.index(features, k=k)
            return {"ad_ids": ids, "scores": scores}

        self.serve = serve


class RankingServable(tf.Module):
    """Raw request rows -> calibrated pCTR and pCVR (position tower dropped).

    The ad text embedding of an ad the model's catalog knows is read from the catalog's table of
    cached (frozen-encoder) embeddings, keyed by ad id, inside the graph; only the rows of unknown ads
    are tokenized (TF Text ops) and encoded by BERT, and only when a batch has any (`tf.cond`). A known
    ad's text therefore comes from the catalog, not from the request (a changed creative needs a new
    export or a new ad id). `cache_text=False` encodes every row's text (the reference path).

    With `explanations` the signature also returns each row's `because_ad_ids`, `because_weights`
    [batch, 3] and `group_contributions` [batch, G] (trainer/explain.py; `reference`: the average
    cross-network input, `explain.reference_input`, None the zero vector).
    """

    def __init__(self, ranking: RankingModel, schema: FeatureSchema, text: TextAssets, cache_text: bool = True,
                 reference: np.ndarray | None = None, explanations: bool = True):
        super().__init__()
        self.ranking = ranking
        self.packer = text.packer.packer
        self.tokenizer = text.tokenizer
        self.encoder = text.adapter
        # Keras 3 export duplicates variable handles; tracking the raw tf.Variables here is
        # what lets the TF1 loader (TF Serving) restore them.
        self.inner_vars = [v.value for v in text.adapter.backbone.variables]
        specs = {**_query_specs(schema), **_user_specs(ranking), **_ad_specs(schema)}
        separator = schema.text_separator
        catalog_text = ranking.catalog_text

        def encode(features, rows=None):
            parts = [features[n] if rows is None else tf.gather(features[n], rows) for n in schema.ad_text]
            text = parts[0]
            for p in parts[1:]:
                text = tf.strings.join([text, p], separator=separator)
            token_ids, mask = self.packer(self.tokenizer(text))
            return tf.cast(self.encoder(tf.cast(token_ids, tf.int32), tf.cast(mask, tf.bool)), tf.float32)

        def scored(inputs):  # calibrated pctr, pcvr; no position input
            if not explanations:
                return self.ranking.serve_probabilities(inputs)
            probabilities, why = scored_and_explained(self.ranking, inputs, reference)
            return {**probabilities, **why}

        @tf.function(input_signature=[specs])
        def serve(features):
            inputs = {n: features[n] for n in ranking.feature_names}
            if not cache_text:
                inputs["text_embedding"] = encode(features)
                return scored(inputs)
            ad_ids = features[schema.ad_id]
            known = catalog_text.lookup(ad_ids) > 0
            cached = tf.cast(catalog_text(ad_ids), tf.float32)
            unknown = tf.where(tf.logical_not(known))[:, 0]
            shape = tf.shape(cached, out_type=tf.int64)

            def encode_unknown():
                return tf.scatter_nd(unknown[:, None], encode(features, unknown), shape)

            encoded = tf.cond(tf.size(unknown) > 0, encode_unknown, lambda: tf.zeros_like(cached))
            inputs["text_embedding"] = tf.where(known[:, None], cached, encoded)
            return scored(inputs)

        self.serve = serve


def catalog_bids(catalog, schema: FeatureSchema) -> np.ndarray:
    """Each catalog ad's bid (1.0 where the catalog has no bid column or a missing bid)."""
    if schema.bid and schema.bid in catalog.columns:
        return catalog[schema.bid].astype("float64").fillna(1.0).to_numpy(np.float32)
    return np.ones(len(catalog), np.float32)


def objective_score(objective: str, pctr, pcvr, bid):
    """The ordering score: pCTR, eCPM = bid x pCTR (CPC bids), or bid x pCTR x pCVR (CPA bids)."""
    if objective == "pctr":
        return pctr
    if objective == "ecpm":
        return bid * pctr
    if objective == "cpa":
        return bid * pctr * pcvr
    raise ExportError(f"export.objective {objective!r}: expected one of {OBJECTIVES}")


class RecommenderServable(tf.Module):
    """retrieve -> drop excluded ads -> rank by the objective -> return the best k, in one graph.

    Inputs: the query features and `excluded_ad_ids` [batch, M] (ads already shown, frequency-capped
    or blocked; padded with ""). The graph retrieves `retrieve_n + m` candidates (from the
    export.index's index: an IVF index probes as many partitions as that needs), m the most distinct
    catalog ads any request of the batch excludes (at most the whole catalog), drops the excluded
    ones (trainer/exclusion.py: by catalog row, never by comparing strings) and ranks exactly each
    request's best `retrieve_n` remaining (by retrieval score), so a request's answer does not
    depend on the rest of its batch; excluded ads never come back. If fewer than k ads remain, the
    tail slots hold the sentinel ad id "" with pctr = pcvr = score = 0 and retrieval_scores = -inf
    (the client drops them).
    When the ranking model reads the user's past, the request's `history`, `negative_history` and
    counters are given to every candidate's ranking (`history` feeds retrieval too).
    Outputs [batch, k]: `ad_ids`, `pctr`, `pcvr` (calibrated, position dropped), `score` (the
    objective's value, the order), `retrieval_scores`; with `explanations`, for each returned ad
    `because_ad_ids` and `because_weights` [batch, k, 3] ("" and 0 in filler slots) and
    `group_contributions` [batch, k, G] (trainer/explain.py, against `reference`).
    """

    def __init__(self, trained: TrainedModels, retrieve_n: int, k: int, objective: str = "pctr",
                 layout: IvfLayout | None = None, reference: np.ndarray | None = None, explanations: bool = True):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ExportError(f"export.objective {objective!r}: expected one of {OBJECTIVES}")
        schema = trained.schema
        catalog = trained.catalog
        size = len(catalog)
        n = min(retrieve_n, size)
        k = min(k, n)
        self.query_tower = trained.retrieval.query_tower
        self.ranking = trained.ranking
        self.index = catalog_index(trained, tf.range(size, dtype=tf.int32), n, layout)
        self.ad_columns = {c: tf.Variable(catalog[c].astype(str).tolist(), trainable=False, name=c)
                           for c in schema.ad_string_features}
        self.text_table = tf.Variable(trained.catalog_text_embeddings, trainable=False,
                                      name="text_embeddings")
        self.bids = tf.Variable(catalog_bids(catalog, schema), trainable=False, name="bids")
        try:
            self.catalog_rows = CatalogRows(catalog[schema.ad_id].astype(str).tolist())
        except ValueError as err:
            raise ExportError(f"recommender: {err}") from err
        specs = {**_query_specs(schema, self.query_tower.history_length), **_user_specs(self.ranking)}
        if HISTORY in specs and specs[HISTORY].shape[1] != self.query_tower.history_length:
            raise ExportError(f"the ranking model reads a history of {specs[HISTORY].shape[1]} ads, the retrieval "
                              f"model {self.query_tower.history_length}: one request history cannot feed both")
        specs[EXCLUDED_AD_IDS] = tf.TensorSpec([None, None], tf.string, name=EXCLUDED_AD_IDS)
        retrieval_inputs = tuple(_query_specs(schema, self.query_tower.history_length))
        per_request = (*schema.query_features, *self.ranking.user_inputs)  # the ranking reads them per candidate

        def candidate_inputs(features, flat_rows, times):
            """The ranking's inputs for catalog rows `flat_rows` [B * times]: each ad's columns and text, and
            each request's values once per candidate (history: [B * times, N])."""
            inputs = {c: tf.gather(t, flat_rows) for c, t in self.ad_columns.items()}
            for name in per_request:
                value = features[name]
                inputs[name] = tf.reshape(tf.repeat(value[:, None], times, axis=1),
                                          tf.concat([[-1], tf.shape(value)[1:]], axis=0))
            inputs["text_embedding"] = tf.gather(self.text_table, flat_rows)
            return inputs

        @tf.function(input_signature=[specs])
        def serve(features):
            query = {name: features[name] for name in retrieval_inputs}  # + history
            excluded = self.catalog_rows.sorted_rows(features[EXCLUDED_AD_IDS])  # [B, M + 1]
            # Over-fetch by the most distinct catalog ads any request in the batch excludes.
            fetch = tf.minimum(n + tf.maximum(tf.reduce_max(distinct_known(excluded)), 0), size)
            fetched_scores, fetched = self.index(query, k=fetch)  # [B, fetch], by retrieval score
            # Each request ranks its own best `n` non-excluded candidates, whatever else is in the batch.
            columns, valid = first_allowed(tf.logical_not(is_excluded(excluded, fetched)), n)  # [B, n]
            rows = tf.gather(fetched, columns, batch_dims=1)
            retrieval_scores = tf.gather(fetched_scores, columns, batch_dims=1)
            flat_rows = tf.reshape(rows, [-1])
            probs = self.ranking.serve_probabilities(candidate_inputs(features, flat_rows, n))
            pctr = tf.reshape(probs["pctr"], [-1, n])
            pcvr = tf.reshape(probs["pcvr"], [-1, n])
            score = objective_score(objective, pctr, pcvr, tf.gather(self.bids, rows))
            ids = tf.gather(self.ad_columns[schema.ad_id], rows)
            # Filler slots (fewer than n allowed) sort after every valid one and are masked below.
            top = tf.math.top_k(tf.where(valid, score, float("-inf")), k=k)

            kept = tf.gather(valid, top.indices, batch_dims=1)  # [B, k]: a real ad, not a filler slot

            def pick(values, fill):
                return tf.where(kept, tf.gather(values, top.indices, batch_dims=1), fill)

            out = {"ad_ids": pick(ids, PAD_AD_ID), "pctr": pick(pctr, 0.0), "pcvr": pick(pcvr, 0.0),
                   "score": pick(score, 0.0), "retrieval_scores": pick(retrieval_scores, float("-inf"))}
            if not explanations:
                return out
            # Explained for the k returned ads only: their inputs gathered again, [B * k] rows.
            returned = tf.reshape(tf.gather(rows, top.indices, batch_dims=1), [-1])
            why = explain(self.ranking, candidate_inputs(features, returned, k), reference)
            for name, value in why.items():  # [B * k, w] -> [B, k, w]; filler slots "" / 0
                value = tf.reshape(value, [-1, k, value.shape[-1]])
                fill = tf.constant(PAD_AD_ID if value.dtype == tf.string else 0, value.dtype)
                out[name] = tf.where(kept[:, :, None], value, fill)
            return out

        self.serve = serve
