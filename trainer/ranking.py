"""The TFRS ranking model: DCN-v2 cross layers and a deep tower over user, context and ad features,
multi-task heads (pCTR, and pCVR trained the ESMM way over all impressions), a shallow position
tower used only in training, and in-graph calibrators for the served probabilities.

Training objective (per impression):
    ctr_logit_train = ctr_logit + position_logit(position[, position_tower_context])
    loss = ctr_loss_weight   * BCE(click,              sigmoid(ctr_logit_train))
         + ctcvr_loss_weight * BCE(click * conversion, sigmoid(ctr_logit_train) * sigmoid(cvr_logit))
pCVR is never fitted on clicked rows alone: it is supervised only through pCTCVR = pCTR x pCVR over
the whole impression space (ESMM, Ma et al. 2018), so it has no sample-selection bias.

Serving (the exported graphs, `predict_ctr`): the position tower is skipped (its logit is dropped,
as in "Recommending what to watch next", Zhao et al. 2019), so the served pCTR ranks by relevance;
`ctr_calibrator` / `cvr_calibrator` then map the served logits to calibrated probabilities (fitted
on held-out training rows, see trainer/calibration.py).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from features.history import HISTORY
from features.schema import FeatureSchema
from features.user_stats import NEGATIVE_HISTORY, RECENT_CLICKS, USER_CLICKS, USER_EVENTS, USER_STATS
from features.vocab import Vocabularies
from trainer.calibration import Calibrator
from trainer.config import RankingConfig
from trainer.loss_scaling import ScaledLossModel
from trainer.towers import (
    CatalogText,
    CatalogVectors,
    CategoricalEmbedding,
    FeatureEmbeddings,
    ItemStatsFeatures,
    TargetAttention,
    UserStatsFeatures,
    XlaSwitch,
    embedding_dims,
    mlp,
    table_rows,
)

MAX_POSITION = 20  # positions above this share one embedding


class PositionTower(tf.keras.layers.Layer):
    """Shallow tower: position (+ `ranking.position_tower_context` categoricals) -> one logit."""

    def __init__(self, context: dict[str, list], units: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.position_embedding = tf.keras.layers.Embedding(MAX_POSITION + 1, 8, name="position_embedding")
        self.context = {n: CategoricalEmbedding(v, 4, False, name=f"pos_{n}") for n, v in context.items()}
        self.hidden = tf.keras.layers.Dense(units, activation="relu", name="position_hidden")
        self.out = tf.keras.layers.Dense(1, dtype="float32", name="position_logit")

    def get_config(self) -> dict:
        """`units` and, per context feature, its vocabulary's size: the vocabularies are data (the
        lookup sublayers' configs hold them), so `from_config` cannot rebuild the tower."""
        return {**super().get_config(), "units": int(self.hidden.units),
                "context_vocabulary_sizes": {n: int(e.embedding.input_dim) - 1 for n, e in self.context.items()}}

    def call(self, position, features):
        p = tf.clip_by_value(tf.cast(position, tf.int64), 0, MAX_POSITION)
        parts = [self.position_embedding(p)] + [self.context[n](features[n]) for n in self.context]
        return tf.squeeze(self.out(self.hidden(tf.concat(parts, axis=-1))), axis=-1)


class RankingModel(ScaledLossModel):
    """DCN-v2: x0 -> Cross x N and a deep MLP (stacked or parallel) -> CTR and CVR logits.

    x0 concatenates the embeddings of the user, context and ad features, the projected ad text
    embedding, the projected L2-normalised creative vector (`catalog_vectors`, when the catalog has
    them), and, when configured, what the user did before the event: the `history` of earlier
    positives (`ranking.history`) and the `negative_history` of earlier non-clicks
    (`ranking.negative_history`), each pooled as the mean of its ads' frozen text embeddings (through
    the ad text's projection), the cosine between that mean and the ad's text, and log(1 + length);
    the user's counters (`ranking.user_stats`, `features/user_stats.py`); and the ad's training click
    rate and count (`ranking.item_stats`, out-of-fold for training rows: `ItemStatsFeatures`). The histories carry
    no per-ad parameters: a history id embedding overfits on MovieLens (docs/evaluation.md).
    The ad's text embedding comes from the catalog's table (`catalog_text`, frozen embeddings) during
    training, or is passed in as `text_embedding` (the exported ranking graph encodes unknown ads' text).
    `use_position`: train with the position tower (needs a position column).
    `use_conversion`: train the ESMM CVR head (needs a conversion column); otherwise pCVR is
    untrained and reported as such.
    `id_counts`: training rows per vocabulary row (OOV first) of each id feature, for
    `ranking.id_frequency_l2`; `click_prior`: the training click rate the user counters shrink to;
    `history_length`: the width N of the history inputs (`retrieval.history_length`);
    `item_statistics`: the (clicks, rows) tables of `trainer.towers.item_statistics` (`ranking.item_stats`).
    """

    def __init__(self, schema: FeatureSchema, vocabularies: Vocabularies, cfg: RankingConfig,
                 catalog_text: CatalogText, jit_compile: bool = False, use_position: bool = True,
                 use_conversion: bool = True, id_counts: dict[str, np.ndarray] | None = None,
                 click_prior: float = 0.5, history_length: int = 0,
                 item_statistics: tuple[np.ndarray, np.ndarray] | None = None,
                 catalog_vectors: CatalogVectors | None = None):
        super().__init__()
        if cfg.architecture not in ("stacked", "parallel"):
            raise ValueError(f"ranking.architecture {cfg.architecture!r}: expected 'stacked' or 'parallel'")
        self.schema = schema
        self.cfg = cfg
        names = (*schema.query_features, *schema.ad_string_features)
        dims = embedding_dims(names, vocabularies, (schema.user_id, schema.ad_id),
                              cfg.embedding_dim, cfg.embedding_dim)
        if cfg.ad_categorical_dim:  # e.g. the ad topic: wide enough for a full-rank user x topic cross
            dims.update({n: cfg.ad_categorical_dim for n in schema.ad_categoricals})
        row_l2 = None
        if cfg.id_frequency_l2 and id_counts:
            row_l2 = {n: cfg.id_frequency_l2 / np.maximum(np.asarray(c, np.float64), 1.0) for n, c in id_counts.items()}
        self.embeddings = FeatureEmbeddings(names, vocabularies, dims, schema.query_int_features,
                                            l2=cfg.embedding_l2, oov_rates={schema.user_id: cfg.user_id_dropout},
                                            row_l2=row_l2)
        self.catalog_text = catalog_text
        self.text_projection = tf.keras.layers.Dense(32, name="text_projection")
        # The ads' creative vectors (image / video embeddings): looked up by ad id in the catalog's table,
        # in training and in every served graph alike (an ad outside the catalog reads zeros).
        self.catalog_vectors = catalog_vectors
        self.vector_projection = None if catalog_vectors is None else \
            tf.keras.layers.Dense(32, name="vector_projection")
        self.histories = (*((HISTORY,) if cfg.history else ()),
                          *((NEGATIVE_HISTORY,) if cfg.negative_history else ()))
        self.history_length = history_length if self.histories else 0  # the history inputs' width
        self.history_attention = {}  # history name -> its unit (`ranking.attention_joint`: one for both)
        if cfg.history_pool == "target_attention":
            def unit(name):
                return TargetAttention(cfg.attention_units, cfg.attention_dropout, cfg.attention_scale,
                                       positions=self.history_length if cfg.attention_positions else 0,
                                       name=f"{name}_attention")
            joint = unit("joint_history") if cfg.attention_joint else None
            self.history_attention = {name: joint or unit(name) for name in self.histories}
        self.user_stats = UserStatsFeatures(cfg.recent_window, click_prior, name="user_stats") \
            if cfg.user_stats else None
        self.item_stats = None
        if cfg.item_stats and item_statistics is not None:
            self.item_stats = ItemStatsFeatures(vocabularies[schema.ad_id], *item_statistics, click_prior,
                                                name="item_stats")
        self.cross_layers = [tfrs.layers.dcn.Cross(projection_dim=cfg.cross_projection_dim or None,
                                                   name=f"cross_{i}") for i in range(cfg.cross_layers)]
        self.deep = mlp(cfg.deep_units, None, name="deep")
        self.heads = tf.keras.layers.Dense(2, dtype="float32", name="ctr_cvr_heads")
        self.use_position = bool(use_position and cfg.position_tower and schema.position)
        self.use_conversion = bool(use_conversion and schema.conversion and cfg.ctcvr_loss_weight > 0)
        context = {n: vocabularies[n] for n in cfg.position_tower_context if n in schema.context_categoricals}
        self.position_tower = PositionTower(context, name="position_tower") if self.use_position else None
        self.ctr_calibrator = Calibrator(cfg.calibration_knots, name="ctr_calibrator")
        self.cvr_calibrator = Calibrator(cfg.calibration_knots, name="cvr_calibrator")
        self.interact = XlaSwitch(self._interact, jit_compile)
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True,
                                                    reduction=tf.keras.losses.Reduction.SUM),
            metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")],
        )
        self.task._autocast = False  # labels and loss stay float32 under mixed precision
        self.ctcvr_auc = tf.keras.metrics.AUC(name="ctcvr_auc")

    @property
    def user_inputs(self) -> tuple[str, ...]:
        """The inputs beyond the query and ad features: `history` and/or the user counters."""
        return (*self.histories, *(USER_STATS if self.user_stats is not None else ()))

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every feature the served forward pass reads (the ranking signature adds the ad text)."""
        return (*self.schema.query_features, *self.user_inputs, *self.schema.ad_string_features)

    def set_statistics(self, click_prior: float, item_statistics: tuple[np.ndarray, np.ndarray] | None) -> None:
        """The data-derived constants (the click prior, the ads' click tables) from new training rows."""
        if self.user_stats is not None:
            self.user_stats.prior.assign(click_prior)
        if self.item_stats is not None and item_statistics is not None:
            self.item_stats.set_statistics(*item_statistics, click_prior)

    def get_config(self) -> dict:
        """Nothing for Keras to serialize: the model is rebuilt from the job's config and rows
        (`trainer.builders.build_ranking`), its weights from checkpoints."""
        return {}

    def build_from_batch(self, features) -> None:
        """Create every variable (no metric updates, safe in a cross-replica context)."""
        self.logits(features, with_position=True)
        self(features)  # the served forward pass: Keras needs one __call__ to save the model

    def checkpoint_parts(self) -> dict:
        """The trained layers and fitted calibrators; the catalog's text table is rebuilt from the catalog."""
        parts = {"embeddings": self.embeddings, "text_projection": self.text_projection,
                 **({"vector_projection": self.vector_projection} if self.vector_projection is not None else {}),
                 "cross_layers": self.cross_layers, "deep": self.deep, "heads": self.heads,
                 "ctr_calibrator": self.ctr_calibrator, "cvr_calibrator": self.cvr_calibrator}
        for name in ("position_tower", "user_stats", "item_stats"):
            if getattr(self, name) is not None:
                parts[name] = getattr(self, name)
        for name, attention in self.history_attention.items():  # a joint unit is saved once per name: one object
            parts[f"{name}_attention"] = attention
        return parts

    def logits(self, features, with_position: bool = False, training: bool = False) -> dict[str, tf.Tensor]:
        """{'ctr': served CTR logit (no position), 'cvr': CVR logit, 'ctr_train': with the position logit}."""
        both = self.interact(self.cross_input(self.input_parts(features, training=training)))
        out = {"ctr": both[:, 0], "cvr": both[:, 1]}
        out["ctr_train"] = out["ctr"]
        if with_position and self.position_tower is not None:
            out["position"] = self.position_tower(features[self.schema.position], features)
            out["ctr_train"] = out["ctr"] + out["position"]
        return out

    def input_parts(self, features, training: bool = False) -> list[tuple[str, tf.Tensor]]:
        """The cross network's input x0 in pieces, each labelled with its feature group (`EXPLANATION_GROUPS`),
        in x0's column order: what `trainer/explain.py` replaces to see how a group moves the score."""
        text = self.candidate_text(features)
        names = self.embeddings.names
        widths = [int(self.embeddings.tables[n].embedding.output_dim) for n in names]
        pieces = tf.split(self.embeddings(features, training=training), widths, axis=-1)
        parts = [(self.group_of(n), piece) for n, piece in zip(names, pieces, strict=True)]
        parts.append(("ad_text", self.text_projection(text)))
        if self.catalog_vectors is not None:  # the creative vector: the ad's own content beside its text
            vectors = tf.math.l2_normalize(self.catalog_vectors(features[self.schema.ad_id]), -1)
            parts.append(("ad", self.vector_projection(vectors)))
        for name in self.histories:
            terms = self.history_terms(features[name], text, self.history_attention.get(name),
                                       clicked=name == HISTORY, training=training)
            parts += [(name, p) for p in self.history_parts(terms["pooled"], terms["unit_text"], terms["length"],
                                                            terms["mass"])]
        if self.user_stats is not None:
            parts.append(("user", self.user_stats(features[USER_EVENTS], features[USER_CLICKS],
                                                  features[RECENT_CLICKS])))
        if self.item_stats is not None:
            parts.append(("ad", self.item_stats(features[self.schema.ad_id], features[self.schema.user_id],
                                                training=training)))
        return parts

    def candidate_text(self, features) -> tf.Tensor:
        """The ad's text embedding: `text_embedding` when given (the exported ranking graph encodes
        unknown ads' text), else the catalog's table."""
        text = features.get("text_embedding")
        if text is None:
            text = self.catalog_text(features[self.schema.ad_id])
        return tf.cast(text, tf.float32)

    def group_of(self, feature: str) -> str:
        """The explanation group (`EXPLANATION_GROUPS`) of one of the embedded features."""
        schema = self.schema
        if feature in (schema.user_id, *schema.user_categoricals):
            return "user"
        if feature in schema.ad_string_features:
            return "ad"
        return "context"

    @staticmethod
    def cross_input(parts) -> tf.Tensor:
        """x0: the parts concatenated in the embeddings' compute dtype (bfloat16 under mixed precision)."""
        dtype = parts[0][1].dtype
        return tf.concat([tf.cast(p, dtype) for _, p in parts], axis=-1)

    def history_terms(self, history, text, attention=None, clicked: bool = True,
                      training: bool = False) -> dict[str, tf.Tensor]:
        """What a history's features are made of: `vectors` [b, N, d] (the history ads' unit text
        embeddings), `weights` [b, N] (1, or the target attention's weight, for ads in the catalog; 0 for
        padding and unknown ads), `known` [b, N] (in the catalog), `pooled` [b, d] (the weighted sum over
        the known ads divided by `pool_divisor` of their count), `unit_text` [b, d] (the candidate's unit
        text embedding), `length` [b, 1] (non-padding entries), `mass` [b, 1] (the mean weight over the
        known ads, 0 for none).

        Pooled by the mean, or with `attention` (`ranking.history_pool: target_attention`) by the
        candidate's weights over the history ads (`ranking.attention_keys: projected`: weights computed
        from the text projection of both; `ranking.attention_joint`: the unit also reads `clicked`, whether
        this history holds clicks or non-clicks). Ads outside the catalog add nothing to the pool (but count in
        the length); "" is padding."""
        rows = self.catalog_text.lookup(history)
        known = tf.cast(rows > 0, tf.float32)
        vectors = tf.math.l2_normalize(tf.cast(table_rows(self.catalog_text.table, rows), tf.float32), -1)
        unit_text = tf.math.l2_normalize(text, -1)
        if attention is None:
            weights = known
            pooled = tf.reduce_sum(vectors * known[:, :, None], axis=1) / self.pool_divisor(
                tf.reduce_sum(known, axis=1, keepdims=True))
        else:
            keys = query = None
            if self.cfg.attention_keys == "projected":
                keys, query = self.text_projection(vectors), self.text_projection(unit_text)
            flags = tf.fill(tf.concat([tf.shape(rows), [1]], 0), float(clicked)) if self.cfg.attention_joint else None
            pooled, weights = attention(vectors, unit_text, rows > 0, keys, query, flags, training=training)
        length = tf.reduce_sum(tf.cast(tf.not_equal(history, ""), tf.float32), axis=1, keepdims=True)
        weights = tf.cast(weights, tf.float32)
        mass = self.weight_mass(tf.reduce_sum(weights, axis=1, keepdims=True),
                                tf.reduce_sum(known, axis=1, keepdims=True))
        return {"vectors": vectors, "weights": weights, "known": known,
                "pooled": pooled, "unit_text": unit_text, "length": length, "mass": mass}

    @staticmethod
    def weight_mass(weight_sum, count) -> tf.Tensor:
        """The mean weight over `count` known ads (0 for none): `ranking.attention_mass`'s feature."""
        return weight_sum / tf.maximum(count, 1.0)

    def pool_divisor(self, count) -> tf.Tensor:
        """What a history's weighted sum over `count` known ads is divided by: the count (at least 1),
        or 1 for target attention with `ranking.attention_scale: sum`."""
        units = list(self.history_attention.values())
        return units[0].divisor(count) if units else tf.maximum(count, 1.0)

    def history_parts(self, pooled, unit_text, length, mass) -> list[tf.Tensor]:
        """[projected pooled text embedding, its cosine with the candidate's text, log(1 + length)], and
        with target attention and `ranking.attention_mass` the mean weight `mass`; leading axes are free
        ([b, d] or [b, N, d]: the leave-one-out variants of `trainer/explain.py`)."""
        cosine = tf.reduce_sum(tf.math.l2_normalize(pooled, -1) * unit_text, axis=-1, keepdims=True)
        parts = [self.text_projection(pooled), cosine, tf.math.log1p(length)]
        if self.history_attention and self.cfg.attention_mass:
            parts.append(tf.cast(mass, parts[0].dtype))
        return parts

    def call(self, features):
        """The served (position-free, uncalibrated) CTR logit."""
        return self.logits(features)["ctr"]

    def serve_probabilities(self, features) -> dict[str, tf.Tensor]:
        """Calibrated pCTR and pCVR with the position tower dropped: what the servables return."""
        return self.calibrated(self.logits(features))

    def calibrated(self, logits: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """`logits`' ('ctr', 'cvr') calibrated pCTR and pCVR."""
        pctr = self.ctr_calibrator(logits["ctr"])
        # Without conversion labels the CVR head is untrained: pCVR is a constant 1 (cpa = ecpm).
        pcvr = self.cvr_calibrator(logits["cvr"]) if self.use_conversion else tf.ones_like(pctr)
        return {"pctr": pctr, "pcvr": pcvr}

    def _interact(self, x0):
        x = x0
        for cross in self.cross_layers:
            x = cross(x0, x)
        if self.cfg.architecture == "stacked":
            hidden = self.deep(x)
        else:  # parallel: cross network and deep tower side by side on x0, concatenated
            hidden = tf.concat([x, self.deep(x0)], axis=-1)
        return tf.cast(self.heads(hidden), tf.float32)

    def compute_loss(self, features, training=False):
        out = self.logits(features, with_position=True, training=training)
        click = tf.cast(features[self.schema.click], tf.float32)
        # [batch, 1]: Keras' BinaryCrossentropy averages over the last axis before its SUM reduction,
        # so 1-D [batch] tensors would give the batch MEAN (then divided by the batch again below).
        ctr_loss = self.task(labels=click[:, None], predictions=out["ctr_train"][:, None], training=training)
        total = self.cfg.ctr_loss_weight * ctr_loss
        if self.use_conversion:
            ctcvr_label = click * tf.cast(features[self.schema.conversion], tf.float32)
            # log pCTCVR = log sigmoid(ctr) + log sigmoid(cvr), computed stably from logits.
            log_p = tf.math.log_sigmoid(out["ctr_train"]) + tf.math.log_sigmoid(out["cvr"])
            p = tf.exp(log_p)
            log_not_p = tf.math.log(tf.maximum(-tf.math.expm1(log_p), 1e-7))
            ctcvr_loss = -tf.reduce_sum(ctcvr_label * log_p + (1.0 - ctcvr_label) * log_not_p)
            self.ctcvr_auc.update_state(ctcvr_label, p)
            total = total + self.cfg.ctcvr_loss_weight * ctcvr_loss
        # Replica gradients are summed, so each replica divides by the global batch: the update
        # is the mean over the global batch whatever the number of replicas.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(click)[0] * replicas, total.dtype)
        return total / tf.maximum(global_batch, 1.0)
