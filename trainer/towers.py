"""Building blocks shared by the retrieval and ranking models (tf_keras layers).

Every categorical is looked up inside the model from its raw value, so exported graphs
take raw strings and ints and unseen values fall into an out-of-vocabulary bucket.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.text_encoder import BertEncoderAdapter


def table_rows(table, rows):
    """`table[rows]` for any shape of `rows`. `tf.nn.embedding_lookup` reads a plain variable and a
    ShardedVariable (a table split across parameter servers) alike; `tf.gather` on the latter takes 1-D
    indices only."""
    return tf.nn.embedding_lookup(table, rows)


class CategoricalEmbedding(tf.keras.layers.Layer):
    """Raw value -> vocabulary index (index 0 is the OOV bucket) -> embedding."""

    def __init__(self, vocabulary: list, dim: int, is_int: bool, l2: float = 0.0, oov_rate: float = 0.0,
                 row_l2: np.ndarray | None = None, hash_buckets: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.oov_rate = oov_rate  # training only: this share of values is looked up as unknown (OOV)
        # Training only: a penalty row_l2[row] * |embedding|^2 for each looked-up value, averaged over the
        # batch. With row_l2 = l2 / (the value's training count) every row gets the same total penalty per
        # epoch, while its data gradient grows with its count: ids seen a few times stay near zero.
        self.row_l2 = None if row_l2 is None else tf.constant(np.asarray(row_l2, np.float32))
        self.hash_buckets = hash_buckets
        if hash_buckets:
            # An unbounded id space (`data.stream.hash_buckets`): every value, seen or not, has a bucket
            # (no OOV row; colliding values share one), the same in training and in the served graph.
            if row_l2 is not None:
                raise ValueError("a hashed feature has no per-value counts for a frequency-aware L2")
            if oov_rate > 0:
                raise ValueError("a hashed feature has no OOV row to drop values to (oov_rate must be 0)")
            self.lookup = tf.keras.layers.Hashing(num_bins=hash_buckets)
        elif is_int:
            self.lookup = tf.keras.layers.IntegerLookup(
                vocabulary=np.asarray(vocabulary, dtype=np.int64), mask_token=None, num_oov_indices=1)
        else:
            self.lookup = tf.keras.layers.StringLookup(
                vocabulary=[str(v) for v in vocabulary], mask_token=None, num_oov_indices=1)
        self.embedding = tf.keras.layers.Embedding(
            hash_buckets or len(vocabulary) + 1, dim,
            embeddings_regularizer=tf.keras.regularizers.l2(l2) if l2 else None)

    def get_config(self) -> dict:
        """The constructor's arguments, for the SavedModel's Keras metadata. The vocabulary and `row_l2`
        are data, not configuration, so they appear as sizes: the lookup sublayer's own config holds the
        vocabulary, and `row_l2` comes from the training rows. `from_config` therefore cannot rebuild the
        layer (a TypeError, which Keras' loader handles); jobs rebuild it from their vocabularies."""
        regularizer = self.embedding.embeddings_regularizer
        size = int(self.embedding.input_dim) - (0 if self.hash_buckets else 1)  # rows beside the OOV row
        return {**super().get_config(), "vocabulary_size": size,
                "dim": int(self.embedding.output_dim),
                "is_int": isinstance(self.lookup, tf.keras.layers.IntegerLookup), "hash_buckets": self.hash_buckets,
                "l2": float(regularizer.l2) if regularizer is not None else 0.0, "oov_rate": float(self.oov_rate),
                "row_l2_size": None if self.row_l2 is None else int(self.row_l2.shape[0])}

    def call(self, values, training=None):
        rows = self.lookup(values)
        if training and self.oov_rate > 0:
            # Teaches the OOV row what an unknown value means (e.g. users who arrive after training).
            rows = tf.where(tf.random.uniform(tf.shape(rows)) < self.oov_rate, tf.zeros_like(rows), rows)
        out = self.embedding(rows)
        if training and self.row_l2 is not None:
            squared = tf.reduce_sum(tf.square(tf.cast(out, tf.float32)), axis=-1)
            self.add_loss(tf.reduce_mean(tf.gather(self.row_l2, rows) * squared))
        return out


class FeatureEmbeddings(tf.keras.layers.Layer):
    """Concatenated embeddings of a fixed list of categorical features."""

    def __init__(self, names: tuple[str, ...], vocabularies, dims: dict[str, int],
                 int_features: tuple[str, ...] = (), l2: float = 0.0, oov_rates: dict[str, float] | None = None,
                 row_l2: dict[str, np.ndarray] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.names = tuple(names)
        oov_rates = oov_rates or {}
        row_l2 = row_l2 or {}
        self.tables = {
            n: CategoricalEmbedding(vocabularies[n], dims[n], n in int_features, l2, oov_rates.get(n, 0.0),
                                    row_l2.get(n), hash_buckets=getattr(vocabularies, "hashed", {}).get(n, 0),
                                    name=f"emb_{n}")
            for n in self.names
        }

    def get_config(self) -> dict:
        """Per feature its embedding width, vocabulary size and OOV rate (the tables' own configs say the
        rest). The vocabularies are data: sizes only, as in `CategoricalEmbedding.get_config`."""
        tables = {n: self.tables[n].get_config() for n in self.names}
        return {**super().get_config(), "names": list(self.names),
                "dims": {n: c["dim"] for n, c in tables.items()},
                "int_features": [n for n, c in tables.items() if c["is_int"]],
                "l2": max((c["l2"] for c in tables.values()), default=0.0),
                "oov_rates": {n: c["oov_rate"] for n, c in tables.items() if c["oov_rate"]},
                "vocabulary_sizes": {n: c["vocabulary_size"] for n, c in tables.items()}}

    def call(self, features, training=None):
        return tf.concat([self.tables[n](features[n], training=training) for n in self.names], axis=-1)


def embedding_dims(names, vocabularies, id_names: tuple[str, ...], id_dim: int, small_dim: int):
    """Ids get `id_dim`; small categoricals get min(small_dim, ~1.6 * cardinality ** 0.56)."""
    dims = {}
    for n in names:
        if n in id_names:
            dims[n] = id_dim
        else:
            size = getattr(vocabularies, "hashed", {}).get(n) or len(vocabularies[n]) + 1
            dims[n] = int(min(small_dim, max(2, round(1.6 * size ** 0.56))))
    return dims


class CatalogText(tf.keras.layers.Layer):
    """Ad id -> the ad's text embedding, from the catalog the model was built with.

    Frozen mode holds one cached embedding per catalog ad (computed once by the encoder);
    full mode holds the ads' token ids and runs the trainable encoder on every batch.
    Unknown ads get a zero vector.
    """

    def __init__(self, catalog_ids: list[str], *, cached_embeddings: np.ndarray | None = None,
                 packed_tokens: dict[str, np.ndarray] | None = None,
                 encoder: BertEncoderAdapter | None = None, **kwargs):
        super().__init__(**kwargs)
        if (cached_embeddings is None) == (encoder is None):
            raise ValueError("CatalogText needs exactly one of cached_embeddings or encoder")
        self.lookup = tf.keras.layers.StringLookup(
            vocabulary=list(catalog_ids), mask_token=None, num_oov_indices=1)
        self.encoder = encoder
        if cached_embeddings is not None:
            table = np.concatenate([np.zeros((1, cached_embeddings.shape[1]), np.float32),
                                    cached_embeddings.astype(np.float32)])
            self.output_dim = table.shape[1]
            self.table = self.add_weight(
                name="text_embeddings", shape=table.shape, trainable=False,
                initializer=tf.keras.initializers.Constant(table))
        else:
            ids = packed_tokens["token_ids"].astype(np.int32)
            mask = packed_tokens["padding_mask"].astype(bool)
            ids = np.concatenate([np.zeros((1, ids.shape[1]), np.int32), ids])
            mask = np.concatenate([np.zeros((1, mask.shape[1]), bool), mask])
            mask[0, 0] = True  # unknown ad: a lone [PAD], masked in, keeps pooling finite
            self.output_dim = encoder.output_dim
            self.token_ids = self.add_weight(
                name="token_ids", shape=ids.shape, dtype=tf.int32, trainable=False,
                initializer=tf.keras.initializers.Constant(ids))
            self.padding_mask = tf.constant(mask)

    def get_config(self) -> dict:
        """How the layer reads text, and the catalog's size. The catalog ids, its cached embeddings or
        token ids are data (weights and a lookup table), and the encoder is a sublayer saved on its own,
        so none of them is repeated here; `from_config` cannot rebuild the layer."""
        rows = self.table if self.encoder is None else self.token_ids
        return {**super().get_config(), "catalog_size": int(rows.shape[0]) - 1,
                "text": "cached_embeddings" if self.encoder is None else "encoder", "output_dim": int(self.output_dim)}

    def call(self, ad_ids):
        rows = self.lookup(ad_ids)
        if self.encoder is None:
            return table_rows(self.table, rows)
        # A batch repeats popular ads (and a catalog pass none): BERT, the whole cost of a trainable
        # encoder, runs once per distinct ad and the rows gather its output. The same values and
        # gradients as one BERT pass per row (gather's gradient sums the repeats), for fewer FLOPs; in
        # training, the repeats of an ad share one dropout mask.
        distinct, position = tf.unique(tf.reshape(rows, [-1]))  # tf.unique takes a vector
        pooled = self.encoder(table_rows(self.token_ids, distinct), tf.gather(self.padding_mask, distinct))
        pooled = tf.gather(pooled, tf.reshape(position, tf.shape(rows)))
        return pooled * tf.cast(rows > 0, pooled.dtype)[..., None]  # bfloat16 when BERT runs in bf16


class CatalogVectors(tf.keras.layers.Layer):
    """Ad id -> the ad's precomputed creative vector (an image or video embedding from the catalog).

    A constant table of the catalog the model was built with, baked into every exported graph like
    the cached text embeddings; unknown ads get a zero vector."""

    def __init__(self, catalog_ids: list[str], vectors: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        if vectors.ndim != 2 or len(vectors) != len(catalog_ids):
            raise ValueError(f"CatalogVectors: expected one vector per catalog ad ({len(catalog_ids)}), "
                             f"got shape {list(vectors.shape)}")
        self.lookup = tf.keras.layers.StringLookup(
            vocabulary=list(catalog_ids), mask_token=None, num_oov_indices=1)
        table = np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors.astype(np.float32)])
        self.output_dim = table.shape[1]
        self.table = self.add_weight(name="ad_vectors", shape=table.shape, trainable=False,
                                     initializer=tf.keras.initializers.Constant(table))

    def get_config(self) -> dict:
        """The catalog's size and the vectors' width; the vectors are data (a weight), so `from_config`
        cannot rebuild the layer."""
        return {**super().get_config(), "catalog_size": int(self.table.shape[0]) - 1,
                "output_dim": int(self.output_dim)}

    def call(self, ad_ids):
        return table_rows(self.table, self.lookup(ad_ids))


class HistoryPooling(tf.keras.layers.Layer):
    """A [batch, N] history of ad ids ("" = padding) -> a fixed-width summary of the user's recent positives.

    Output: [id mean (id_dim), text mean (text_dim, when a text table is given), log(1 + length),
    and with `attention_layers > 0` the attention encoder's summary (attention_dim)]. Ids outside the
    training vocabulary (e.g. ads launched after training) add nothing to the id mean but still add
    their text; an empty history gives zeros. The text table is a constant of the catalog (the frozen
    encoder's embeddings), not trained.

    The attention encoder reads the `attention_length` most recent entries as a sequence: each ad is
    its id embedding and projected text embedding plus a learned recency-position embedding, passed
    through `attention_layers` transformer blocks (bidirectional self-attention over the non-padding
    entries, then a position-wise feed-forward layer, each with a residual connection and layer
    normalisation), then mean-pooled over the non-padding entries. The mean pools every entry with
    equal weight; attention lets entries weigh one another (a run of one genre, a recent switch).
    """

    def __init__(self, ad_vocabulary: list, id_dim: int, catalog_ids: list[str] | None = None,
                 text_table: np.ndarray | None = None, attention_layers: int = 0, attention_heads: int = 2,
                 attention_length: int = 50, attention_dim: int = 64, dropout: float = 0.0,
                 attention_pool: str = "mean", **kwargs):
        super().__init__(**kwargs)
        self.id_lookup = tf.keras.layers.StringLookup(
            vocabulary=[str(v) for v in ad_vocabulary], mask_token=None, num_oov_indices=1)
        self.id_embedding = tf.keras.layers.Embedding(len(ad_vocabulary) + 1, id_dim, name="history_ad_id")
        self.text_lookup = None
        if text_table is not None:
            self.text_lookup = tf.keras.layers.StringLookup(
                vocabulary=list(catalog_ids), mask_token=None, num_oov_indices=1)
            table = np.concatenate([np.zeros((1, text_table.shape[1]), np.float32), text_table.astype(np.float32)])
            self.text_table = self.add_weight(name="history_text_embeddings", shape=table.shape, trainable=False,
                                              initializer=tf.keras.initializers.Constant(table))
        self.attention = None
        if attention_layers:
            self.attention = SequenceEncoder(attention_layers, attention_heads, attention_dim, attention_length,
                                             dropout, pool=attention_pool, name="history_attention")

    def get_config(self) -> dict:
        """Widths and the attention encoder's settings; the ad vocabulary and the text table are data
        (a lookup table and a weight), given by their sizes, so `from_config` cannot rebuild the layer."""
        config = {**super().get_config(), "ad_vocabulary_size": int(self.id_embedding.input_dim) - 1,
                  "id_dim": int(self.id_embedding.output_dim),
                  "text_table_shape": None if self.text_lookup is None else [int(d) for d in self.text_table.shape],
                  "attention_layers": 0}
        if self.attention is not None:
            encoder = self.attention.get_config()
            config.update({f"attention_{k}": encoder[k]
                           for k in ("layers", "heads", "length", "dim", "dropout", "pool")})
        return config

    @staticmethod
    def _masked_mean(values, mask):
        mask = tf.cast(mask, values.dtype)[:, :, None]
        return tf.reduce_sum(values * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

    def call(self, history, training=None):
        rows = self.id_lookup(history)
        ids = tf.cast(self.id_embedding(rows), tf.float32)
        parts = [self._masked_mean(ids, rows > 0)]
        text = None
        if self.text_lookup is not None:
            text_rows = self.text_lookup(history)
            text = tf.cast(table_rows(self.text_table, text_rows), tf.float32)  # bf16 under mixed precision
            parts.append(self._masked_mean(text, text_rows > 0))
        present = tf.not_equal(history, "")
        length = tf.reduce_sum(tf.cast(present, tf.float32), axis=1, keepdims=True)
        parts.append(tf.math.log1p(length))
        if self.attention is not None:
            # The encoder reads only its `length` newest entries: slicing before the concat keeps the
            # concat and its gradient at that width instead of the whole history's.
            n = self.attention.length
            items = ids[:, :n] if text is None else tf.concat([ids[:, :n], text[:, :n]], axis=-1)
            parts.append(self.attention(items, present[:, :n], training=training))
        return tf.concat(parts, axis=-1)


class TargetAttention(tf.keras.layers.Layer):
    """DIN's activation unit (Zhou et al. 2018): the candidate ad attends over the user's history ads.

    Each history entry gets the weight 1 + MLP([k, q, k * q, k - q]) for its key k and the candidate's
    query q (by default the history and candidate vectors themselves; `keys`/`query` let the unit compare
    other views of them, e.g. a learned projection); the output is the weighted sum of the present
    history vectors, divided by their count (`scale="mean"`) or not (`scale="sum"`, as in the paper). The
    weights are not softmax-normalised (as in DIN: the summary keeps how strongly the history speaks for
    this ad), and the MLP's last layer starts at zero, so an untrained unit is exactly the mean (or sum)
    pooling it replaces. `dropout`: on the hidden layers, in training. `positions`: the history's width N
    to learn a `position_dim`-wide embedding per entry position (entries are most recent first) that the
    MLP reads beside the comparison, so a weight can depend on recency (0: no position input).
    `entry_features` [batch, N, e] (a call argument): more per-entry inputs of the MLP, e.g. whether the
    entry was a click, when one unit weighs two histories. Returns
    (summary [batch, d], weights [batch, N], 0 where absent)."""

    SCALES = ("mean", "sum")

    def __init__(self, units: int | tuple[int, ...] = 32, dropout: float = 0.0, scale: str = "mean",
                 positions: int = 0, position_dim: int = 8, **kwargs):
        super().__init__(**kwargs)
        if positions < 0 or position_dim < 1:
            raise ValueError(f"TargetAttention positions / position_dim: expected >= 0 / >= 1, got "
                             f"{positions!r} / {position_dim!r}")
        if scale not in self.SCALES:
            raise ValueError(f"TargetAttention scale: expected one of {list(self.SCALES)}, got {scale!r}")
        units = (units,) if isinstance(units, int) else tuple(units)
        if not units or min(units) < 1:
            raise ValueError(f"TargetAttention units: expected positive layer widths, got {units!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TargetAttention dropout: expected a rate in [0, 1), got {dropout!r}")
        self.scale = scale
        self.hidden = [tf.keras.layers.Dense(u, activation="relu", name="hidden" if i == 0 else f"hidden_{i}")
                       for i, u in enumerate(units)]
        self.dropout = tf.keras.layers.Dropout(dropout) if dropout else None
        self.out = tf.keras.layers.Dense(1, kernel_initializer="zeros", name="weight")
        self.positions, self.position_dim = int(positions), int(position_dim)
        self.position = tf.keras.layers.Embedding(self.positions, self.position_dim, name="position") \
            if self.positions else None

    def get_config(self) -> dict:
        """The constructor's arguments; `from_config` rebuilds the layer."""
        return {**super().get_config(), "units": [int(h.units) for h in self.hidden],
                "dropout": float(self.dropout.rate) if self.dropout is not None else 0.0, "scale": self.scale,
                "positions": self.positions, "position_dim": self.position_dim}

    def divisor(self, count):
        """What the weighted sum over `count` present entries is divided by."""
        return tf.maximum(count, 1.0) if self.scale == "mean" else tf.ones_like(count)

    def call(self, history, candidate, present, keys=None, query=None, entry_features=None, training=None):
        keys = history if keys is None else keys
        query = candidate if query is None else query
        q = tf.broadcast_to(query[:, None, :], tf.shape(keys))
        parts = [keys, q, keys * q, keys - q]
        if self.position is not None:
            n = tf.shape(keys)[1]
            tf.debugging.assert_less_equal(n, self.positions, message="TargetAttention: history wider than positions")
            pos = tf.cast(self.position(tf.range(n)), keys.dtype)
            parts.append(tf.broadcast_to(pos[None], tf.concat([tf.shape(keys)[:2], [self.position_dim]], 0)))
        if entry_features is not None:
            parts.append(tf.cast(entry_features, keys.dtype))
        x = tf.concat(parts, axis=-1)
        for layer in self.hidden:
            x = layer(x)
            if self.dropout is not None:
                x = self.dropout(x, training=training)
        mask = tf.cast(present, history.dtype)
        weights = (1.0 + tf.squeeze(self.out(x), axis=-1)) * mask
        summary = tf.reduce_sum(weights[:, :, None] * history, axis=1) / self.divisor(
            tf.reduce_sum(mask, axis=1, keepdims=True))
        return summary, weights


class SequenceEncoder(tf.keras.layers.Layer):
    """[batch, N, d_in] item vectors + a [batch, N] presence mask -> [batch, dim]: the first `length`
    entries (most recent first) projected to `dim`, plus a learned position embedding, through
    transformer blocks that attend only to present entries, mean-pooled over the present ones.

    `pool="mean_and_newest"` also returns the newest entry's output (zeros for an empty history),
    [batch, 2 * dim]: the mean weighs every entry alike, the newest entry's state has read the others
    from where the user is now, the signal next-item models predict from."""

    POOLS = ("mean", "mean_and_newest")

    def __init__(self, layers: int, heads: int, dim: int, length: int, dropout: float = 0.0, pool: str = "mean",
                 **kwargs):
        super().__init__(**kwargs)
        if pool not in self.POOLS:
            raise ValueError(f"SequenceEncoder pool: expected one of {list(self.POOLS)}, got {pool!r}")
        self.pool = pool
        self.length = length
        self.project = tf.keras.layers.Dense(dim, name="project")
        self.position = tf.keras.layers.Embedding(length, dim, name="position")
        self.blocks = [TransformerBlock(heads, dim, dropout, name=f"block_{i}") for i in range(layers)]

    def get_config(self) -> dict:
        """The constructor's arguments (read back from the sublayers); `from_config` rebuilds the layer."""
        block = self.blocks[0].get_config() if self.blocks else {"heads": None, "dropout": 0.0}
        return {**super().get_config(), "layers": len(self.blocks), "heads": block["heads"],
                "dim": int(self.project.units), "length": int(self.length), "dropout": block["dropout"],
                "pool": self.pool}

    def call(self, items, present, training=None):
        items, present = items[:, :self.length], present[:, :self.length]
        n = tf.shape(items)[1]
        x = self.project(items) + self.position(tf.range(n))[None]
        mask = present[:, None, :] & present[:, :, None]
        for block in self.blocks:
            x = block(x, mask, training=training)
        weights = tf.cast(present, x.dtype)[:, :, None]
        mean = tf.reduce_sum(x * weights, axis=1) / tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)
        if self.pool == "mean":
            return mean
        return tf.concat([mean, x[:, 0] * weights[:, 0]], axis=-1)  # entry 0 is the newest


class TransformerBlock(tf.keras.layers.Layer):
    """Post-norm transformer encoder block: self-attention and a feed-forward layer, each residual."""

    def __init__(self, heads: int, dim: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.attention = tf.keras.layers.MultiHeadAttention(heads, max(dim // heads, 1), dropout=dropout,
                                                            name="attention")
        self.feed_forward = tf.keras.Sequential([tf.keras.layers.Dense(dim * 2, activation="relu"),
                                                 tf.keras.layers.Dense(dim)], name="feed_forward")
        self.norm_attention = tf.keras.layers.LayerNormalization(name="norm_attention")
        self.norm_feed_forward = tf.keras.layers.LayerNormalization(name="norm_feed_forward")
        self.dropout = tf.keras.layers.Dropout(dropout)

    def get_config(self) -> dict:
        """The constructor's arguments (read back from the sublayers); `from_config` rebuilds the layer."""
        return {**super().get_config(), "heads": int(self.attention.get_config()["num_heads"]),
                "dim": int(self.feed_forward.layers[-1].units), "dropout": float(self.dropout.rate)}

    def call(self, x, mask, training=None):
        attended = self.attention(x, x, attention_mask=mask, training=training)
        x = self.norm_attention(x + self.dropout(attended, training=training))
        return self.norm_feed_forward(x + self.dropout(self.feed_forward(x), training=training))


class UserStatsFeatures(tf.keras.layers.Layer):
    """The user's counters before the event (`features/user_stats.py`) -> [log(1 + events) / 5,
    logit of the smoothed click rate over all earlier events, logit of the smoothed rate over the last
    `window`, log(1 + min(events, window)) / 5].

    Rates are shrunk to `prior` (the training click rate, a non-trainable weight so checkpoints carry
    it) with `strength` / `recent_strength` pseudo-events: a user with no history gets the prior.
    """

    def __init__(self, window: int, prior: float, strength: float = 10.0, recent_strength: float = 2.0, **kwargs):
        super().__init__(dtype="float32", **kwargs)  # counts and rates stay float32 under mixed precision
        self.window = float(window)
        self.strength, self.recent_strength = float(strength), float(recent_strength)
        self.prior = self.add_weight(name="click_prior", shape=(), trainable=False,
                                     initializer=tf.keras.initializers.Constant(float(prior)))

    def get_config(self) -> dict:
        """The constructor's arguments; `prior` is the weight's current value (the training click rate,
        which checkpoints and `RankingModel.set_statistics` may change). `dtype` is left out: the layer
        fixes it (float32) itself. `from_config` rebuilds the layer."""
        config = {k: v for k, v in super().get_config().items() if k != "dtype"}
        return {**config, "window": int(self.window), "prior": float(tf.keras.backend.get_value(self.prior)),
                "strength": self.strength, "recent_strength": self.recent_strength}

    def call(self, events, clicks, recent_clicks):
        events, clicks, recent = (tf.cast(v, tf.float32) for v in (events, clicks, recent_clicks))
        recent_events = tf.minimum(events, self.window)
        prior = tf.clip_by_value(self.prior, 1e-3, 1.0 - 1e-3)

        def logit(hits, n, strength):
            rate = (hits + strength * prior) / (n + strength)
            return tf.math.log(rate) - tf.math.log1p(-rate)

        return tf.stack([tf.math.log1p(events) / 5.0, logit(clicks, events, self.strength),
                         logit(recent, recent_events, self.recent_strength),
                         tf.math.log1p(recent_events) / 5.0], axis=-1)


class ItemStatsFeatures(tf.keras.layers.Layer):
    """Ad id -> [logit of the ad's smoothed training click rate, log(1 + its training rows) / 5].

    The statistics are tables in the graph, built from the training rows (`item_statistics`): row 0 of
    `clicks` / `rows` [folds + 1, vocabulary + 1] over all of them, row f + 1 over the rows outside fold
    f. A training row reads its out-of-fold row, its fold a hash of its user and ad ids, so its own label
    never feeds its feature; served rows read the statistics of every training row. Ads outside the
    vocabulary get the prior and a count of 0.
    """

    def __init__(self, ad_vocabulary: list, clicks: np.ndarray, rows: np.ndarray, prior: float,
                 strength: float = 5.0, **kwargs):
        super().__init__(dtype="float32", **kwargs)  # counts and rates stay float32 under mixed precision
        self.folds = clicks.shape[0] - 1
        self.strength = float(strength)
        self.lookup = tf.keras.layers.StringLookup(vocabulary=[str(v) for v in ad_vocabulary], mask_token=None,
                                                   num_oov_indices=1)
        self.clicks = self.add_weight(name="clicks", shape=clicks.shape, trainable=False,
                                      initializer=tf.keras.initializers.Constant(clicks.astype(np.float32)))
        self.rows = self.add_weight(name="rows", shape=rows.shape, trainable=False,
                                    initializer=tf.keras.initializers.Constant(rows.astype(np.float32)))
        self.prior = self.add_weight(name="click_prior", shape=(), trainable=False,
                                     initializer=tf.keras.initializers.Constant(float(prior)))

    def get_config(self) -> dict:
        """Scalars only: the vocabulary and the click and row tables are data from the training rows (a
        lookup table and weights, replaced by `set_statistics`), given by their sizes; `from_config`
        cannot rebuild the layer. `dtype` is left out: the layer fixes it (float32) itself."""
        config = {k: v for k, v in super().get_config().items() if k != "dtype"}
        return {**config, "vocabulary_size": int(self.clicks.shape[1]) - 1, "folds": int(self.folds),
                "prior": float(tf.keras.backend.get_value(self.prior)), "strength": self.strength}

    def set_statistics(self, clicks: np.ndarray, rows: np.ndarray, prior: float) -> None:
        """New tables (a warm start on new rows: the statistics follow the data, not the checkpoint)."""
        self.clicks.assign(clicks.astype(np.float32))
        self.rows.assign(rows.astype(np.float32))
        self.prior.assign(float(prior))

    def call(self, ad_ids, user_ids, training=None):
        index = self.lookup(ad_ids)
        fold = fold_of(user_ids, ad_ids, self.folds) + 1 if training else tf.zeros_like(index)
        at = tf.stack([fold, index], axis=-1)
        clicks, rows = tf.gather_nd(self.clicks, at), tf.gather_nd(self.rows, at)
        prior = tf.clip_by_value(self.prior, 1e-3, 1.0 - 1e-3)
        rate = (clicks + self.strength * prior) / (rows + self.strength)
        return tf.stack([tf.math.log(rate) - tf.math.log1p(-rate), tf.math.log1p(rows) / 5.0], axis=-1)


def fold_of(user_ids, ad_ids, folds: int):
    """A row's fold for out-of-fold statistics: a hash of its user and ad ids (the same in and out of graphs)."""
    return tf.strings.to_hash_bucket_fast(tf.strings.join([user_ids, ad_ids], separator="\x1f"), folds)


def item_statistics(ad_vocabulary: list, user_ids, ad_ids, clicks, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """The `ItemStatsFeatures` tables [folds + 1, vocabulary + 1] (clicks, rows) of training rows."""
    index = {str(v): i + 1 for i, v in enumerate(ad_vocabulary)}
    ads = np.asarray([str(a) for a in ad_ids], dtype=object)
    column = np.array([index.get(a, 0) for a in ads], dtype=np.int64)
    fold = fold_of(tf.constant(np.asarray([str(u) for u in user_ids], dtype=object)), tf.constant(ads), folds).numpy()
    size = len(ad_vocabulary) + 1
    y = np.asarray(clicks, np.float64) > 0
    total_clicks = np.bincount(column, weights=y, minlength=size)
    total_rows = np.bincount(column, minlength=size).astype(np.float64)
    out_clicks, out_rows = [total_clicks], [total_rows]
    scale = folds / (folds - 1)  # out-of-fold counts on the scale of all training rows, as served
    for f in range(folds):
        inside = fold == f
        out_clicks.append(scale * (total_clicks - np.bincount(column[inside], weights=y[inside], minlength=size)))
        out_rows.append(scale * (total_rows - np.bincount(column[inside], minlength=size)))
    return np.stack(out_clicks), np.stack(out_rows)


class XlaSwitch:
    """Runs a model's dense core XLA-compiled when asked.

    String lookups cannot be compiled (XLA has no string ops), so only the numeric part after
    the embeddings is; exports turn it off (`jit = False`) so served graphs need no XLA JIT.
    """

    def __init__(self, fn, enabled: bool):
        self.plain = fn
        self.compiled = tf.function(fn, jit_compile=True, reduce_retracing=True)
        self.jit = enabled

    def __call__(self, *args):
        return self.compiled(*args) if self.jit else self.plain(*args)


def mlp(units: tuple[int, ...], output_dim: int | None = None, name: str | None = None):
    layers = [tf.keras.layers.Dense(u, activation="relu") for u in units]
    if output_dim is not None:  # float32 output, also under a mixed-precision policy
        layers.append(tf.keras.layers.Dense(output_dim, dtype="float32"))
    return tf.keras.Sequential(layers, name=name)
