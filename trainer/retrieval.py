"""The TFRS two-tower retrieval model: query tower (user + context + recent history) and ad tower
(id, categoricals, BERT text); in-batch softmax with logQ correction, accidental-hit removal and
optional hard-negative mining."""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from features.history import HISTORY
from features.schema import FeatureSchema
from features.vocab import Vocabularies
from trainer.config import RetrievalConfig
from trainer.towers import CatalogText, FeatureEmbeddings, HistoryPooling, XlaSwitch, embedding_dims, mlp


@contextlib.contextmanager
def _float32_policy():
    """The TFRS task builds its logQ / accidental-hit / hard-negative layers inside its call, under
    the global policy: under mixed precision they would autocast the float32 scores and labels."""
    policy = tf.keras.mixed_precision.global_policy()
    if policy.compute_dtype == "float32":
        yield
        return
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)


class QueryTower(tf.keras.Model):
    """User id, user categoricals, context and the user's recent positives -> L2-normalised query embedding.

    With `cfg.history_length > 0` the tower reads `history` ([batch, N] ad ids, "" = padding):
    masked means of the history ads' id embeddings and (frozen) text embeddings.
    """

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RetrievalConfig,
                 jit_compile: bool = False, catalog_ids: list[str] | None = None,
                 history_text_table: np.ndarray | None = None):
        super().__init__(name="query_tower")
        names = schema.query_features
        dims = embedding_dims(names, vocabularies, (schema.user_id,), cfg.id_embedding_dim, 16)
        self.feature_names = names
        self.history_length = cfg.history_length
        self.embeddings = FeatureEmbeddings(names, vocabularies, dims, schema.query_int_features,
                                            oov_rates={schema.user_id: cfg.user_id_dropout})
        self.history = None
        if self.history_length:
            self.history = HistoryPooling(vocabularies[schema.ad_id], cfg.id_embedding_dim, catalog_ids,
                                          history_text_table if cfg.history_text else None, name="history")
        self.head = mlp((cfg.hidden_units,), cfg.embedding_dim, name="query_mlp")
        self.core = XlaSwitch(lambda x: tf.math.l2_normalize(tf.cast(self.head(x), tf.float32), axis=-1),
                              jit_compile)

    def call(self, features, training=None):
        x = self.embeddings(features, training=training)
        if self.history is not None:
            x = tf.concat([x, tf.cast(self.history(features[HISTORY]), x.dtype)], axis=-1)
        return self.core(x)

    def checkpoint_parts(self) -> dict:
        """The trained layers (the history's text table is rebuilt from the current catalog)."""
        parts = {"embeddings": self.embeddings, "head": self.head}
        if self.history is not None:
            parts["history_ids"] = self.history.id_embedding
        return parts


class AdTower(tf.keras.Model):
    """Ad id, ad categoricals and the ad's text embedding -> L2-normalised ad embedding."""

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RetrievalConfig,
                 jit_compile: bool = False):
        super().__init__(name="ad_tower")
        names = schema.ad_string_features
        dims = embedding_dims(names, vocabularies, (schema.ad_id,), cfg.id_embedding_dim, 16)
        self.embeddings = FeatureEmbeddings(names, vocabularies, dims, oov_rates={schema.ad_id: cfg.ad_id_dropout})
        self.text_projection = tf.keras.layers.Dense(cfg.hidden_units, activation="relu",
                                                     name="text_projection")
        self.head = mlp((cfg.hidden_units,), cfg.embedding_dim, name="ad_mlp")
        self.core = XlaSwitch(
            lambda ids, text: tf.math.l2_normalize(
                tf.cast(self.head(tf.concat([ids, self.text_projection(text)], axis=-1)), tf.float32), axis=-1),
            jit_compile)

    def call(self, features, training=None):
        return self.core(self.embeddings(features, training=training), features["text_embedding"])


class RetrievalModel(tfrs.Model):
    """In-batch softmax over (query, clicked ad) pairs, with temperature on cosine scores."""

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RetrievalConfig,
                 catalog_text: CatalogText, catalog_features: dict | None = None, jit_compile: bool = False,
                 history_text_table: np.ndarray | None = None, sampling_counts: dict[str, float] | None = None):
        """`history_text_table`: per catalog ad (in `catalog_features` order) the frozen text embedding the
        query tower pools over a history; `sampling_counts`: ad id -> training positives, for logQ."""
        super().__init__()
        self.schema = schema
        catalog_ids = None if catalog_features is None else [
            v.decode() if isinstance(v, bytes) else str(v) for v in catalog_features[schema.ad_id]]
        self.query_tower = QueryTower(schema, vocabularies, cfg, jit_compile, catalog_ids, history_text_table)
        self.ad_tower = AdTower(schema, vocabularies, cfg, jit_compile)
        self.catalog_text = catalog_text
        metrics = None
        if catalog_features is not None:
            candidates = tf.data.Dataset.from_tensor_slices(catalog_features).batch(512).map(
                lambda f: (f[schema.ad_id], self.ad_embedding(f)))
            metrics = tfrs.metrics.FactorizedTopK(candidates=candidates, ks=cfg.top_k_metrics)
        self.task = tfrs.tasks.Retrieval(metrics=metrics, temperature=cfg.temperature,
                                         remove_accidental_hits=cfg.remove_accidental_hits,
                                         num_hard_negatives=cfg.num_hard_negatives or None)
        # logQ correction: the softmax over in-batch candidates sees each ad about as often as it is a
        # training positive; subtracting log(frequency) from its logit undoes that sampling bias.
        self.sampling_lookup = None
        if cfg.logq_correction and sampling_counts:
            ids = sorted(sampling_counts)
            counts = np.array([sampling_counts[i] for i in ids], np.float64)
            probs = counts / counts.sum()
            self.sampling_lookup = tf.keras.layers.StringLookup(vocabulary=ids, mask_token=None, num_oov_indices=1)
            self.sampling_probs = tf.constant(np.concatenate([[probs.min()], probs]).astype(np.float32))
        # Scores and the softmax stay float32 under a mixed-precision policy: tf_keras would
        # otherwise cast the task's first input (the query embeddings) to the compute dtype.
        self.task._autocast = False

    def build_from_batch(self, features) -> None:
        """Create the towers' variables (no metric updates, safe in a cross-replica context)."""
        self.query_tower(features, training=False)
        self.ad_embedding(features)

    def set_jit(self, enabled: bool) -> None:
        self.query_tower.core.jit = self.ad_tower.core.jit = enabled

    def checkpoint_parts(self) -> dict:
        """What carries over between runs (warm start): the towers, and BERT when it is trained.

        The catalog's text table is left out: it is rebuilt from the current catalog.
        """
        parts = {"query_tower": tf.train.Checkpoint(**self.query_tower.checkpoint_parts()),
                 "ad_tower": self.ad_tower}
        if self.catalog_text.encoder is not None:
            parts["bert"] = [v.value for v in self.catalog_text.encoder.backbone.variables]
        return parts

    def ad_embedding(self, features, training=None):
        ad = {n: features[n] for n in self.schema.ad_string_features}
        ad["text_embedding"] = self.catalog_text(features[self.schema.ad_id])
        return self.ad_tower(ad, training=training)

    def sampling_probability(self, ad_ids):
        """Each ad's share of the training positives (the in-batch sampling probability)."""
        return tf.gather(self.sampling_probs, self.sampling_lookup(ad_ids))

    def compute_loss(self, features, training=False):
        queries = self.query_tower(features, training=training)
        ads = self.ad_embedding(features, training=training)
        ad_ids = features[self.schema.ad_id]
        probability = self.sampling_probability(ad_ids) if self.sampling_lookup is not None else None
        with _float32_policy():
            return self.task(queries, ads, candidate_ids=ad_ids, candidate_sampling_probability=probability,
                             compute_metrics=not training)
