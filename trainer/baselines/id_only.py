"""Retrieval baselines trained and evaluated in the same run as the model.

`IdOnlyRetrieval` is the two-tower model of the TFRS basic retrieval tutorial: a user-id tower
and an ad-id tower, each a StringLookup + Embedding (dim 32), dot-product scores, the plain
in-batch softmax of `tfrs.tasks.Retrieval`, Adagrad (learning rate 0.1), trained on the same
training positives as the model. Unknown users and ads share one OOV embedding each.
(Most-popular is computed directly from training counts in `trainer.evaluate.evaluate_retrieval`.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_recommenders as tfrs

from features.dataset import make_dataset
from features.schema import FeatureSchema
from features.vocab import Vocabularies
from trainer.config import RetrievalConfig
from trainer.metrics import ranks_in_batches

ID_ONLY_DIM = 32


def _id_tower(vocabulary: list, dim: int, name: str) -> tf.keras.Model:
    return tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=[str(v) for v in vocabulary], mask_token=None),
        tf.keras.layers.Embedding(len(vocabulary) + 1, dim),
    ], name=name)


class IdOnlyRetrieval(tfrs.Model):
    """User id -> embedding, ad id -> embedding, in-batch softmax (the TFRS basic retrieval tutorial)."""

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, dim: int = ID_ONLY_DIM):
        super().__init__()
        self.schema = schema
        self.user_model = _id_tower(vocabularies[schema.user_id], dim, "id_only_user")
        self.ad_model = _id_tower(vocabularies[schema.ad_id], dim, "id_only_ad")
        self.task = tfrs.tasks.Retrieval()

    def compute_loss(self, features, training=False):
        return self.task(self.user_model(features[self.schema.user_id]),
                         self.ad_model(features[self.schema.ad_id]), compute_metrics=False)

    def embed(self, tower, values, batch_size: int = 8192) -> np.ndarray:
        values = np.asarray(pd.Series(values).astype(str), dtype=object)
        return np.concatenate([tower(tf.constant(values[i:i + batch_size])).numpy()
                               for i in range(0, len(values), batch_size)] or [np.zeros((0, 1), np.float32)])

    def ranks(self, user_ids, catalog_ad_ids, targets: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """0-based rank of each target (a catalog row) for each user, ties pessimistic."""
        return ranks_in_batches(self.embed(self.user_model, user_ids), self.embed(self.ad_model, catalog_ad_ids),
                                targets, batch_size)


def train_id_only(rows: pd.DataFrame, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RetrievalConfig,
                  strategy=None, seed: int = 0, verbose: int = 0) -> IdOnlyRetrieval:
    """Fit the ID-only baseline on the positives of `rows` (`cfg.baseline_*` epochs, batch, learning rate)."""
    strategy = strategy or tf.distribute.get_strategy()
    positives = rows[rows[schema.click] > 0]
    ds = make_dataset(positives, (schema.user_id, schema.ad_id), cfg.baseline_batch_size, shuffle=True,
                      seed=seed, schema=schema)
    with strategy.scope():
        model = IdOnlyRetrieval(schema, vocabularies)
        model.compile(optimizer=tf.keras.optimizers.Adagrad(cfg.baseline_learning_rate))
    model.fit(ds, epochs=cfg.baseline_epochs, verbose=verbose)
    return model
