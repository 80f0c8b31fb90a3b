"""The TFRS two-tower retrieval model: query tower (user + context) and ad tower (id, categoricals, BERT text)."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from features.schema import FeatureSchema
from features.vocab import Vocabularies
from trainer.config import RetrievalConfig
from trainer.towers import CatalogText, FeatureEmbeddings, XlaSwitch, embedding_dims, mlp


class QueryTower(tf.keras.Model):
    """User id, user categoricals and context -> L2-normalised query embedding."""

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RetrievalConfig,
                 jit_compile: bool = False):
        super().__init__(name="query_tower")
        names = schema.query_features
        dims = embedding_dims(names, vocabularies, (schema.user_id,), cfg.id_embedding_dim, 16)
        self.feature_names = names
        self.embeddings = FeatureEmbeddings(names, vocabularies, dims, schema.query_int_features)
        self.head = mlp((cfg.hidden_units,), cfg.embedding_dim, name="query_mlp")
        self.core = XlaSwitch(lambda x: tf.math.l2_normalize(tf.cast(self.head(x), tf.float32), axis=-1),
                              jit_compile)

    def call(self, features):
        return self.core(self.embeddings(features))


class AdTower(tf.keras.Model):
    """Ad id, ad categoricals and the ad's text embedding -> L2-normalised ad embedding."""

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RetrievalConfig,
                 jit_compile: bool = False):
        super().__init__(name="ad_tower")
        names = schema.ad_string_features
        dims = embedding_dims(names, vocabularies, (schema.ad_id,), cfg.id_embedding_dim, 16)
        self.embeddings = FeatureEmbeddings(names, vocabularies, dims)
        self.text_projection = tf.keras.layers.Dense(cfg.hidden_units, activation="relu",
                                                     name="text_projection")
        self.head = mlp((cfg.hidden_units,), cfg.embedding_dim, name="ad_mlp")
        self.core = XlaSwitch(
            lambda ids, text: tf.math.l2_normalize(
                tf.cast(self.head(tf.concat([ids, self.text_projection(text)], axis=-1)), tf.float32), axis=-1),
            jit_compile)

    def call(self, features):
        return self.core(self.embeddings(features), features["text_embedding"])


class RetrievalModel(tfrs.Model):
    """In-batch softmax over (query, clicked ad) pairs, with temperature on cosine scores."""

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RetrievalConfig,
                 catalog_text: CatalogText, catalog_features: dict | None = None, jit_compile: bool = False):
        super().__init__()
        self.schema = schema
        self.query_tower = QueryTower(schema, vocabularies, cfg, jit_compile)
        self.ad_tower = AdTower(schema, vocabularies, cfg, jit_compile)
        self.catalog_text = catalog_text
        metrics = None
        if catalog_features is not None:
            candidates = tf.data.Dataset.from_tensor_slices(catalog_features).batch(512).map(
                lambda f: (f[schema.ad_id], self.ad_embedding(f)))
            metrics = tfrs.metrics.FactorizedTopK(candidates=candidates, ks=cfg.top_k_metrics)
        self.task = tfrs.tasks.Retrieval(metrics=metrics, temperature=cfg.temperature)
        # Scores and the softmax stay float32 under a mixed-precision policy: tf_keras would
        # otherwise cast the task's first input (the query embeddings) to the compute dtype.
        self.task._autocast = False

    def build_from_batch(self, features) -> None:
        """Create the towers' variables (no metric updates, safe in a cross-replica context)."""
        self.query_tower(features)
        self.ad_embedding(features)

    def set_jit(self, enabled: bool) -> None:
        self.query_tower.core.jit = self.ad_tower.core.jit = enabled

    def checkpoint_parts(self) -> dict:
        """What carries over between runs (warm start): the towers, and BERT when it is trained.

        The catalog's text table is left out: it is rebuilt from the current catalog.
        """
        parts = {"query_tower": self.query_tower, "ad_tower": self.ad_tower}
        if self.catalog_text.encoder is not None:
            parts["bert"] = [v.value for v in self.catalog_text.encoder.backbone.variables]
        return parts

    def ad_embedding(self, features):
        ad = {n: features[n] for n in self.schema.ad_string_features}
        ad["text_embedding"] = self.catalog_text(features[self.schema.ad_id])
        return self.ad_tower(ad)

    def compute_loss(self, features, training=False):
        queries = self.query_tower(features)
        ads = self.ad_embedding(features)
        return self.task(queries, ads, candidate_ids=features[self.schema.ad_id],
                         compute_metrics=not training)
