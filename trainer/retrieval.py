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
from trainer.config import DPConfig, RetrievalConfig
from trainer.dp import clipped_noised_sum, per_row_gradients, squared_norms
from trainer.loss_scaling import LossScaleOptimizer, ScaledLossModel, apply_together
from trainer.towers import (
    CatalogText,
    CatalogVectors,
    FeatureEmbeddings,
    HistoryPooling,
    XlaSwitch,
    embedding_dims,
    mlp,
)


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


def mask_history(logits, history_rows, target):
    """[batch, catalog] logits with each row's history ads (catalog rows; -1 = padding or unknown) set to
    -1e9, its target kept: a query's earlier positives are excluded at serving, so they are not negatives.

    Written into the logits where the history points (batch x N updates), not through a dense
    [batch, catalog] mask: the history is short and the catalog is not."""
    batch = tf.shape(history_rows)[0]
    keep = (history_rows >= 0) & tf.not_equal(history_rows, target[:, None])
    index = tf.stack([tf.broadcast_to(tf.range(batch, dtype=history_rows.dtype)[:, None],
                                      tf.shape(history_rows))[keep], history_rows[keep]], axis=1)
    return tf.tensor_scatter_nd_update(logits, index, tf.fill(tf.shape(index)[:1], tf.constant(-1e9, logits.dtype)))


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
        self.history_dropout = cfg.history_dropout
        if self.history_length:
            self.history = HistoryPooling(
                vocabularies[schema.ad_id], cfg.id_embedding_dim, catalog_ids,
                history_text_table if cfg.history_text else None,
                attention_layers=cfg.history_attention_layers, attention_heads=cfg.history_attention_heads,
                attention_length=min(cfg.history_attention_length, cfg.history_length),
                attention_dim=cfg.history_attention_dim, attention_pool=cfg.history_attention_pool, name="history")
        self.head = mlp((cfg.hidden_units,), cfg.embedding_dim, name="query_mlp")
        self.core = XlaSwitch(lambda x: tf.math.l2_normalize(tf.cast(self.head(x), tf.float32), axis=-1),
                              jit_compile)

    def get_config(self) -> dict:
        """Nothing for Keras to serialize (as `RankingModel.get_config`): the constructor takes the job's
        schema, vocabularies and config and the catalog's tables, so the model is rebuilt from the job's
        files (`trainer.builders`), its weights from checkpoints. Defined so that saving it does not warn
        about non-serializable arguments."""
        return {}

    def call(self, features, training=None):
        x = self.embeddings(features, training=training)
        if self.history is not None:
            history = features[HISTORY]
            if training and self.history_dropout > 0:  # denoising: the query must do with part of its history
                hidden = tf.random.uniform(tf.shape(history)) < self.history_dropout
                history = tf.where(hidden, tf.constant("", tf.string), history)
            x = tf.concat([x, tf.cast(self.history(history, training=training), x.dtype)], axis=-1)
        return self.core(x)

    def checkpoint_parts(self) -> dict:
        """The trained layers (the history's text table is rebuilt from the current catalog)."""
        parts = {"embeddings": self.embeddings, "head": self.head}
        if self.history is not None:
            parts["history_ids"] = self.history.id_embedding
            if self.history.attention is not None:
                parts["history_attention"] = self.history.attention
        return parts


class AdTower(tf.keras.Model):
    """Ad id, ad categoricals, the ad's text embedding and, when the catalog has them, its creative
    vector (`creative_embedding`, L2-normalised then projected like the text) -> L2-normalised ad embedding."""

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RetrievalConfig,
                 jit_compile: bool = False, with_vectors: bool = False):
        super().__init__(name="ad_tower")
        names = schema.ad_string_features
        dims = embedding_dims(names, vocabularies, (schema.ad_id,), cfg.id_embedding_dim, 16)
        self.embeddings = FeatureEmbeddings(names, vocabularies, dims, oov_rates={schema.ad_id: cfg.ad_id_dropout})
        self.text_projection = tf.keras.layers.Dense(cfg.hidden_units, activation="relu",
                                                     name="text_projection")
        self.vector_projection = tf.keras.layers.Dense(cfg.hidden_units, activation="relu",
                                                       name="vector_projection") if with_vectors else None
        self.head = mlp((cfg.hidden_units,), cfg.embedding_dim, name="ad_mlp")
        self.core = XlaSwitch(self._embed, jit_compile)

    def _embed(self, ids, text, vectors=None):
        parts = [ids, self.text_projection(text)]
        if vectors is not None:
            parts.append(self.vector_projection(tf.math.l2_normalize(tf.cast(vectors, tf.float32), -1)))
        return tf.math.l2_normalize(tf.cast(self.head(tf.concat([tf.cast(p, ids.dtype) for p in parts], axis=-1)),
                                            tf.float32), axis=-1)

    def get_config(self) -> dict:
        """Nothing for Keras to serialize (as `RankingModel.get_config`): the constructor takes the job's
        schema, vocabularies and config and the catalog's tables, so the model is rebuilt from the job's
        files (`trainer.builders`), its weights from checkpoints. Defined so that saving it does not warn
        about non-serializable arguments."""
        return {}

    def call(self, features, training=None):
        ids = self.embeddings(features, training=training)
        if self.vector_projection is None:
            return self.core(ids, features["text_embedding"])
        return self.core(ids, features["text_embedding"], features["creative_embedding"])


class RetrievalModel(ScaledLossModel):
    """In-batch softmax over (query, clicked ad) pairs, with temperature on cosine scores."""

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RetrievalConfig,
                 catalog_text: CatalogText, catalog_features: dict | None = None, jit_compile: bool = False,
                 history_text_table: np.ndarray | None = None, sampling_counts: dict[str, float] | None = None,
                 catalog_vectors: CatalogVectors | None = None, dp: DPConfig | None = None,
                 encoder_optimizer: tf.keras.optimizers.Optimizer | None = None):
        """`history_text_table`: per catalog ad (in `catalog_features` order) the frozen text embedding the
        query tower pools over a history; `sampling_counts`: ad id -> training positives, for logQ;
        `catalog_vectors`: the ads' creative vectors, fused in the ad tower; `dp`: train with DP-SGD
        (trainer/dp.py; needs `cfg.loss` 'full_softmax'); `encoder_optimizer`: steps the trainable text
        encoder's weights (the compiled optimizer then steps only the rest)."""
        super().__init__()
        if encoder_optimizer is not None and catalog_text.encoder is None:
            raise ValueError("an encoder optimizer needs a trainable text encoder (encoder.mode other than frozen)")
        self.encoder_optimizer = encoder_optimizer
        self.schema = schema
        catalog_ids = None if catalog_features is None else [
            v.decode() if isinstance(v, bytes) else str(v) for v in catalog_features[schema.ad_id]]
        self.query_tower = QueryTower(schema, vocabularies, cfg, jit_compile, catalog_ids, history_text_table)
        self.ad_tower = AdTower(schema, vocabularies, cfg, jit_compile, with_vectors=catalog_vectors is not None)
        self.catalog_text = catalog_text
        self.catalog_vectors = catalog_vectors
        self.loss_kind = cfg.loss
        self.top_ks = tuple(cfg.top_k_metrics)
        self.exclude_history_from_loss = cfg.exclude_history_from_loss
        if dp is not None and (cfg.loss != "full_softmax" or cfg.full_softmax_negatives != "all"):
            raise ValueError("privacy.dp needs retrieval.loss 'full_softmax' with full_softmax_negatives 'all' "
                             "(trainer/dp.py)")
        self.dp = dp
        self.dp_batch_size = float(cfg.batch_size)
        if cfg.loss == "full_softmax":
            if catalog_features is None:
                raise ValueError("retrieval.loss 'full_softmax' needs the catalog's features")
            if len(catalog_ids) > cfg.full_softmax_max_ads:
                raise ValueError(f"retrieval.loss 'full_softmax': the catalog has {len(catalog_ids):,d} ads, more than "
                                 f"retrieval.full_softmax_max_ads ({cfg.full_softmax_max_ads:,d}); use 'in_batch'")
            self.catalog_features = {k: tf.constant(v) for k, v in catalog_features.items()}
            self.catalog_rows = tf.keras.layers.StringLookup(vocabulary=catalog_ids, mask_token=None,
                                                             num_oov_indices=1)
            self.temperature = cfg.temperature
            # `full_softmax_negatives: seen`: an ad with no training positive is never a training negative
            # either. Otherwise every step pushes it down, and its text with it: an ad launched after the
            # training rows (cold-start) would be learnt to lose before it was ever shown.
            self.never_positive = None
            if cfg.full_softmax_negatives == "seen" and sampling_counts:
                self.never_positive = tf.constant([i not in sampling_counts for i in catalog_ids])
            for k in self.top_ks:  # attributes, so Keras reports them
                setattr(self, f"top_{k}_accuracy", tf.keras.metrics.Mean(name=f"top_{k}_accuracy"))
        metrics = None
        if catalog_features is not None and cfg.loss != "full_softmax":
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

    def get_config(self) -> dict:
        """Nothing for Keras to serialize (as `RankingModel.get_config`): the constructor takes the job's
        schema, vocabularies and config and the catalog's tables, so the model is rebuilt from the job's
        files (`trainer.builders`), its weights from checkpoints. Defined so that saving it does not warn
        about non-serializable arguments."""
        return {}

    @property
    def monitor(self) -> str:
        """The validation metric early stopping watches: top-K accuracy at the largest K over the catalog."""
        k = max(self.top_ks)
        return f"val_top_{k}_accuracy" if self.loss_kind == "full_softmax" else \
            f"val_factorized_top_k/top_{k}_categorical_accuracy"

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
        if self.catalog_vectors is not None:
            ad["creative_embedding"] = self.catalog_vectors(features[self.schema.ad_id])
        return self.ad_tower(ad, training=training)

    def sampling_probability(self, ad_ids):
        """Each ad's share of the training positives (the in-batch sampling probability)."""
        return tf.gather(self.sampling_probs, self.sampling_lookup(ad_ids))

    def compute_loss(self, features, training=False):
        if self.loss_kind == "full_softmax":
            return self._full_softmax_loss(features, training)
        queries = self.query_tower(features, training=training)
        ads = self.ad_embedding(features, training=training)
        ad_ids = features[self.schema.ad_id]
        probability = self.sampling_probability(ad_ids) if self.sampling_lookup is not None else None
        with _float32_policy():
            return self.task(queries, ads, candidate_ids=ad_ids, candidate_sampling_probability=probability,
                             compute_metrics=not training)

    def _catalog_logits(self, queries, ads, features, training):
        """[batch, catalog] logits of each query against every catalog ad, the loss's masks applied, and
        each row's target (its positive's catalog row)."""
        logits = tf.matmul(queries, ads, transpose_b=True) / self.temperature
        target = self.catalog_rows(features[self.schema.ad_id]) - 1  # every training positive is in the catalog
        if self.exclude_history_from_loss and HISTORY in features:
            logits = mask_history(logits, self.catalog_rows(features[HISTORY]) - 1, target)
        if training and self.never_positive is not None:
            logits = tf.where(self.never_positive[None, :], tf.constant(-1e9, logits.dtype), logits)
        return logits, target

    def _full_softmax_loss(self, features, training):
        """Softmax cross-entropy of each positive against every catalog ad (no sampling, so no logQ)."""
        queries = self.query_tower(features, training=training)
        ads = self.ad_embedding(self.catalog_features, training=training)
        logits, target = self._catalog_logits(queries, ads, features, training)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=logits)
        # The target's rank among the catalog (ties count against it; history ads masked as in the loss).
        target_logit = tf.gather(logits, target, batch_dims=1)[:, None]
        rank = tf.reduce_sum(tf.cast(logits >= target_logit, tf.int32), axis=1) - 1
        for k in self.top_ks:
            getattr(self, f"top_{k}_accuracy").update_state(tf.cast(rank < k, tf.float32))
        # Replica gradients are summed: each replica divides by the global batch.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return tf.reduce_sum(loss) / tf.cast(tf.shape(loss)[0] * replicas, loss.dtype)

    def train_step(self, features):
        if self.dp is not None:
            return self._private_train_step(features)
        return super().train_step(features)

    def _apply_gradients(self, grads, variables) -> None:
        """One optimizer step: the trainable encoder's weights through `encoder_optimizer` when there is
        one (a pretrained BERT wants a far lower rate than freshly initialised towers), the rest through
        the compiled optimizer (under mixed_float16 loss scaling both skip an overflowing step together)."""
        if self.encoder_optimizer is None:
            super()._apply_gradients(grads, variables)
            return
        encoder = {v.ref() for v in self.catalog_text.encoder.trainable_weights}
        pairs = list(zip(grads, variables, strict=True))
        towers = [(g, v) for g, v in pairs if v.ref() not in encoder]
        encoder_pairs = [(g, v) for g, v in pairs if v.ref() in encoder]
        if isinstance(self.optimizer, LossScaleOptimizer):
            apply_together(self.optimizer, towers, self.encoder_optimizer, encoder_pairs)
            return
        self.encoder_optimizer.apply_gradients(encoder_pairs)
        self.optimizer.apply_gradients(towers)

    def _rows(self, features, ads):
        """(features, additive loss masks [batch, catalog], targets): each row's inputs to `_row_loss`.

        The masks do not depend on the weights, so they are built once for the batch, as the ordinary
        loss builds them (adding -1e9 gives the same softmax and gradients as overwriting the logit)."""
        target = self.catalog_rows(features[self.schema.ad_id]) - 1
        masks = tf.zeros([tf.shape(target)[0], tf.shape(ads)[0]])
        if self.exclude_history_from_loss and HISTORY in features:
            masks = mask_history(masks, self.catalog_rows(features[HISTORY]) - 1, target)
        return features, masks, target

    def _row_loss(self, ads, training):
        """One row's full-softmax loss against the catalog's (fixed) `ads`, for `dp.per_row_gradients`;
        also its query and the softmax residual."""
        def row_loss(row):
            features, mask, target = row
            query = self.query_tower(features, training=training)
            logits = tf.matmul(query, ads, transpose_b=True) / self.temperature + mask
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=logits)
            # d loss / d ads = residual (x) query / temperature: rank one, so its norm and the clipped sum
            # need only these two vectors per row, never a [catalog, dim] gradient per row.
            residual = tf.nn.softmax(logits) - tf.one_hot(target, tf.shape(logits)[1], dtype=logits.dtype)
            return loss, (query[0], residual[0], loss[0])
        return row_loss

    def _private_train_step(self, features):
        """One DP-SGD step (trainer/dp.py): per-row gradients of the query tower and of the catalog's ad
        embeddings, clipped jointly, summed and noised; the ad tower learns from the noised ad-embedding
        gradient pushed back through it (it reads only the catalog)."""
        clip, temperature = self.dp.l2_clip, self.temperature
        stddev = self.dp.noise_multiplier * clip
        query_vars = self.query_tower.trainable_variables
        ad_vars = self.ad_tower.trainable_variables
        with tf.GradientTape() as ad_tape:
            ads = self.ad_embedding(self.catalog_features, training=True)
        fixed_ads = tf.stop_gradient(ads)
        grads, (queries, residuals, losses) = per_row_gradients(
            self._row_loss(fixed_ads, training=True), query_vars, self._rows(features, fixed_ads))
        ad_squared = (tf.reduce_sum(tf.square(residuals), 1) * tf.reduce_sum(tf.square(queries), 1)
                      / temperature ** 2)
        norms = tf.sqrt(squared_norms(grads) + ad_squared)
        scale = tf.minimum(1.0, clip / tf.maximum(norms, 1e-12))
        query_grads = clipped_noised_sum(grads, scale, query_vars, stddev, self.dp_batch_size)
        ad_sum = tf.matmul(residuals * scale[:, None], queries, transpose_a=True) / temperature
        ad_noised = (ad_sum + tf.random.normal(tf.shape(ad_sum), stddev=stddev)) / self.dp_batch_size
        ad_grads = ad_tape.gradient(ads, ad_vars, output_gradients=ad_noised)
        self._apply_gradients(query_grads + ad_grads, query_vars + ad_vars)
        return {"loss": tf.reduce_mean(losses), "clipped": tf.reduce_mean(tf.cast(norms > clip, tf.float32))}
