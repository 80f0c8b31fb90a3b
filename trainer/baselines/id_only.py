"""Retrieval baselines trained and evaluated in the same run as the model.

`IdOnlyRetrieval` is the two-tower model of the TFRS basic retrieval tutorial: a user-id tower
and an ad-id tower, each a StringLookup + Embedding (dim 32), dot-product scores, the plain
in-batch softmax of `tfrs.tasks.Retrieval`, Adagrad (learning rate 0.1), trained on the same
training positives as the model. Unknown users and ads share one OOV embedding each.
(`MostPopular` and the other baselines of this package are scored beside it by `trainer.comparison`.)

`IdOnlyScorer` is the same model behind the `Scorer` interface of the side-by-side evaluation: it
learns from `Interactions` (their raw user and ad ids) and scores by user embedding · ad embedding.
It reads no history, as in the tutorial; its epoch count is chosen by early stopping on validation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_recommenders as tfrs

from features.dataset import make_dataset
from features.interactions import Interactions, Queries
from features.schema import DEFAULT_SCHEMA, FeatureSchema
from features.vocab import Vocabularies
from trainer.baselines.base import Scorer
from trainer.baselines.epochs import run_epochs, validation_metric
from trainer.config import RetrievalConfig
from trainer.loss_scaling import ScaledLossModel
from trainer.metrics import ranks_in_batches

ID_ONLY_DIM = 32


def _id_tower(vocabulary: list, dim: int, name: str) -> tf.keras.Model:
    return tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=[str(v) for v in vocabulary], mask_token=None),
        tf.keras.layers.Embedding(len(vocabulary) + 1, dim),
    ], name=name)


class IdOnlyRetrieval(ScaledLossModel):
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


_RECIPE = RetrievalConfig()  # the config's defaults


class IdOnlyScorer(Scorer):
    """`IdOnlyRetrieval` trained from `Interactions`; a user unseen in training (code -1) gets the OOV row.

    Defaults are the tutorial recipe as `train_id_only` runs it (`RetrievalConfig.baseline_*`);
    `grid()` raises the epoch cap so that early stopping on validation, not a fixed count, decides.
    """

    name = "id_only"

    def __init__(self, epochs: int = _RECIPE.baseline_epochs,
                 batch_size: int = _RECIPE.baseline_batch_size,
                 learning_rate: float = _RECIPE.baseline_learning_rate,
                 dim: int = ID_ONLY_DIM, patience: int = 3, seed: int = 0):
        super().__init__(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, dim=dim,
                         patience=patience, seed=seed)

    @classmethod
    def grid(cls) -> list[dict]:
        return [{"epochs": 100}]

    def fit(self, train: Interactions, validation: Queries | None = None) -> None:
        p, schema = self.params, DEFAULT_SCHEMA
        user_ids, item_ids = np.asarray(train.user_ids, object), np.asarray(train.item_ids, object)
        self._user_ids, self._item_ids, self._tables = user_ids, item_ids, None
        positives = pd.DataFrame({schema.user_id: user_ids[train.users], schema.ad_id: item_ids[train.items]})
        vocabularies = Vocabularies({schema.user_id: [str(v) for v in user_ids[np.unique(train.users)]],
                                     schema.ad_id: [str(v) for v in item_ids[np.unique(train.items)]]})
        tf.keras.utils.set_random_seed(p["seed"])  # unseeded Keras initializers draw from Python's and TF's RNGs
        self.model = IdOnlyRetrieval(schema, vocabularies, p["dim"])
        self.model.compile(optimizer=tf.keras.optimizers.Adagrad(p["learning_rate"]))
        ds = make_dataset(positives, (schema.user_id, schema.ad_id), p["batch_size"], shuffle=True, seed=p["seed"],
                          schema=schema)

        def run_epoch(epoch: int) -> float:
            """One pass; the mean loss per positive (the task sums over a batch, and Keras keeps only the last)."""
            self._tables, losses = None, []
            keep = tf.keras.callbacks.LambdaCallback(on_train_batch_end=lambda _, logs: losses.append(logs["loss"]))
            self.model.fit(ds, epochs=1, verbose=0, callbacks=[keep])
            return float(np.sum(losses)) / max(len(positives), 1)

        evaluate = None
        if validation is not None and len(validation):
            popularity = train.item_counts()
            evaluate = lambda: validation_metric(self, validation, popularity)  # noqa: E731
        self.epochs_kept = run_epochs(self.name, run_epoch, p["epochs"], self.model, evaluate, p["patience"])
        self._tables = None

    def tuned_params(self) -> dict:
        return {**self.params, "epochs": int(self.epochs_kept)}

    def _embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(users [n_users + 1, dim] with the OOV row last, so code -1 reads it; ads [n_items, dim])."""
        if self._tables is None:
            oov = self.model.user_model.layers[1].embeddings.numpy()[:1]  # StringLookup's OOV index is 0
            users = np.concatenate([self.model.embed(self.model.user_model, self._user_ids), oov])
            self._tables = users, self.model.embed(self.model.ad_model, self._item_ids)
        return self._tables

    def score(self, queries: Queries, start: int, stop: int) -> np.ndarray:
        users, ads = self._embeddings()
        return (users[queries.users[start:stop]] @ ads.T).astype(np.float32)
