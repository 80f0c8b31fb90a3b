"""The TFRS ranking model: DCN cross layers and a deep tower over user, context and ad features -> pCTR."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from features.schema import FeatureSchema
from features.vocab import Vocabularies
from trainer.config import RankingConfig
from trainer.towers import CatalogText, FeatureEmbeddings, XlaSwitch, embedding_dims, mlp


class RankingModel(tfrs.Model):
    """Stacked DCN: x0 -> Cross x N -> deep MLP -> click logit.

    The ad's text embedding comes from the catalog during training, or is passed in as
    `text_embedding` (the exported ranking graph computes it from raw text).
    """

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RankingConfig,
                 catalog_text: CatalogText, jit_compile: bool = False):
        super().__init__()
        self.schema = schema
        names = (*schema.query_features, *schema.ad_string_features)
        dims = embedding_dims(names, vocabularies, (schema.user_id, schema.ad_id),
                              cfg.embedding_dim, cfg.embedding_dim)
        self.embeddings = FeatureEmbeddings(names, vocabularies, dims, schema.query_int_features,
                                            l2=cfg.embedding_l2)
        self.catalog_text = catalog_text
        self.text_projection = tf.keras.layers.Dense(32, name="text_projection")
        self.cross_layers = [tfrs.layers.dcn.Cross(name=f"cross_{i}") for i in range(cfg.cross_layers)]
        self.deep = mlp(cfg.deep_units, 1, name="deep")
        self.interact = XlaSwitch(self._interact, jit_compile)
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True,
                                                    reduction=tf.keras.losses.Reduction.SUM),
            metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")],
        )
        self.task._autocast = False  # labels and loss stay float32 under mixed precision

    def build_from_batch(self, features) -> None:
        """Create every variable (no metric updates, safe in a cross-replica context)."""
        self(features)

    def checkpoint_parts(self) -> dict:
        """The trained layers; the catalog's text table is rebuilt from the current catalog."""
        return {"embeddings": self.embeddings, "text_projection": self.text_projection,
                "cross_layers": self.cross_layers, "deep": self.deep}

    def call(self, features):
        text = features.get("text_embedding")
        if text is None:
            text = self.catalog_text(features[self.schema.ad_id])
        return self.interact(tf.concat([self.embeddings(features), self.text_projection(text)], axis=-1))

    def _interact(self, x0):
        x = x0
        for cross in self.cross_layers:
            x = cross(x0, x)
        return tf.squeeze(tf.cast(self.deep(x), tf.float32), axis=-1)

    def compute_loss(self, features, training=False):
        logits = self(features)
        summed = self.task(labels=features[self.schema.click], predictions=logits, training=training)
        # Replica gradients are summed, so each replica divides by the global batch: the update
        # is the mean over the global batch whatever the number of replicas.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(logits)[0] * replicas, summed.dtype)
        return summed / tf.maximum(global_batch, 1.0)
