"""SASRec (Kang & McAuley 2018, "Self-Attentive Sequential Recommendation") trained with full softmax.

A causal transformer over a user's item sequence predicts the next item at every position. The
item embedding is shared between input and output (catalog row r is embedding row r + 1; row 0
pads). Training uses a cross-entropy over the whole catalog instead of the original one-negative
binary loss (Klenitskiy & Vasilev 2023, "Turning Dross Into Gold Loss: is BERT4Rec really better
than SASRec?": the full softmax is what makes SASRec competitive).

Training sequences are each user's training positives in time order, cut from the most recent end
into windows of `max_len` (input positions) and left-padded, so the newest item always sits in the
last position, as at query time: a query's history (most recent first in `Queries.history`) is
reversed to time order, its newest `max_len` items kept, and the catalog scored from the last
position's output. An empty history leaves only padding; the final layer norm's learned offset is
then the state, and `rank_queries` breaks what ties by popularity.

Training: Adam at 3e-3 rather than the usual 1e-3, because a small dataset gives few steps per
epoch (one per `batch_size` windows) and 1e-3 is still far from converged after 30 epochs there.
The model first learns popularity and its validation metric stalls for a few epochs before the
sequence signal takes over, so early stopping (patience on the validation metric, best weights
restored) only starts after `min_epochs`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from features.interactions import PAD_ROW, Interactions, Queries
from trainer.baselines.base import Scorer
from trainer.baselines.epochs import EARLY_STOPPING_METRIC, run_epochs, validation_metric


class SASRecNetwork(tf.keras.Model):
    """Item + position embeddings, `blocks` pre-norm causal self-attention blocks, a final layer norm."""

    def __init__(self, n_items: int, dim: int, blocks: int, heads: int, dropout: float, max_len: int):
        super().__init__()
        self.dim, self.max_len = dim, max_len
        self.items = tf.keras.layers.Embedding(n_items + 1, dim, name="items")
        self.positions = tf.keras.layers.Embedding(max_len, dim, name="positions")
        self.input_dropout = tf.keras.layers.Dropout(dropout)
        self.attention_norms = [tf.keras.layers.LayerNormalization(epsilon=1e-6) for _ in range(blocks)]
        self.attention = [tf.keras.layers.MultiHeadAttention(heads, dim // heads, dropout=dropout)
                          for _ in range(blocks)]
        self.attention_dropout = [tf.keras.layers.Dropout(dropout) for _ in range(blocks)]
        self.ffn_norms = [tf.keras.layers.LayerNormalization(epsilon=1e-6) for _ in range(blocks)]
        self.ffn = [tf.keras.Sequential([tf.keras.layers.Dense(dim, activation="relu"),
                                         tf.keras.layers.Dropout(dropout),
                                         tf.keras.layers.Dense(dim),
                                         tf.keras.layers.Dropout(dropout)]) for _ in range(blocks)]
        self.final_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6)

    def call(self, sequences, training=False):
        """int32 [b, max_len] (0 = padding) -> float32 [b, max_len, dim], one state per position."""
        present = tf.cast(sequences > 0, tf.float32)[..., None]  # [b, L, 1]
        x = self.items(sequences) * (self.dim ** 0.5) + self.positions(tf.range(self.max_len))[None]
        x = self.input_dropout(x, training=training) * present
        causal = tf.linalg.band_part(tf.ones((self.max_len, self.max_len)), -1, 0)
        mask = tf.cast(causal[None] * tf.transpose(present, (0, 2, 1)), tf.bool)  # query t sees items at <= t
        for norm, attention, drop, ffn_norm, ffn in zip(self.attention_norms, self.attention, self.attention_dropout,
                                                        self.ffn_norms, self.ffn, strict=True):
            h = norm(x)
            x = x + drop(attention(h, h, attention_mask=mask, training=training), training=training)
            x = (x + ffn(ffn_norm(x), training=training)) * present
        return self.final_norm(x)

    def logits(self, states):
        """[n, dim] -> [n, n_items]: dot products with the (shared) item embeddings of the catalog."""
        return tf.matmul(states, self.items.embeddings[1:], transpose_b=True)


def training_windows(sequences: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-item pairs as (inputs, targets) int32 [n_windows, max_len], embedding rows (item + 1), 0 = padding.

    Each sequence s gives inputs s[:-1] and targets s[1:], cut from the newest end into windows of
    `max_len`; the oldest window of a sequence is left-padded.
    """
    inputs, targets = [], []
    for seq in sequences:
        rows = np.asarray(seq, np.int64) + 1
        for end in range(len(rows) - 1, 0, -max_len):
            start = max(0, end - max_len)
            pad = max_len - (end - start)
            inputs.append(np.concatenate([np.zeros(pad, np.int32), rows[start:end]]))
            targets.append(np.concatenate([np.zeros(pad, np.int32), rows[start + 1:end + 1]]))
    if not inputs:
        return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), np.int32)
    return np.stack(inputs).astype(np.int32), np.stack(targets).astype(np.int32)


def query_sequences(history: np.ndarray, max_len: int) -> np.ndarray:
    """`Queries.history` rows (most recent first, PAD_ROW padded) -> int32 [n, max_len] in time order, newest last."""
    recent = history[:, :max_len]
    rows = np.where(recent == PAD_ROW, 0, recent + 1)[:, ::-1]  # pads move to the front
    out = np.zeros((len(history), max_len), np.int32)
    out[:, max_len - rows.shape[1]:] = rows
    return out


class SASRec(Scorer):
    """Self-attentive sequential recommender over ID histories (see the module docstring)."""

    name = "sasrec"

    def __init__(self, dim: int = 64, blocks: int = 2, heads: int = 1, dropout: float = 0.2, max_len: int = 50,
                 batch_size: int = 128, learning_rate: float = 3e-3, epochs: int = 30, patience: int = 3,
                 min_epochs: int = 10, monitor: str = EARLY_STOPPING_METRIC, seed: int = 0):
        super().__init__(dim=dim, blocks=blocks, heads=heads, dropout=dropout, max_len=max_len,
                         batch_size=batch_size, learning_rate=learning_rate, epochs=epochs, patience=patience,
                         min_epochs=min_epochs, monitor=monitor, seed=seed)

    def fit(self, train: Interactions, validation: Queries | None = None) -> None:
        p = self.params
        tf.keras.utils.set_random_seed(p["seed"])  # unseeded Keras initializers draw from Python's and TF's RNGs
        self.network = SASRecNetwork(train.n_items, p["dim"], p["blocks"], p["heads"], p["dropout"], p["max_len"])
        optimizer = tf.keras.optimizers.Adam(p["learning_rate"])
        inputs, targets = training_windows(train.sequences(), p["max_len"])
        spec = tf.TensorSpec([None, p["max_len"]], tf.int32)

        @tf.function(input_signature=[spec, spec])
        def step(x, y):
            with tf.GradientTape() as tape:
                states = self.network(x, training=True)
                present = y > 0
                logits = self.network.logits(tf.boolean_mask(states, present))
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    tf.boolean_mask(y, present) - 1, logits))
            variables = self.network.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            return loss

        rng = np.random.default_rng(p["seed"])

        def run_epoch(epoch: int) -> float:
            order = rng.permutation(len(inputs))
            batches = np.array_split(order, -(-len(order) // p["batch_size"])) if len(order) else []
            losses = [float(step(inputs[b], targets[b])) for b in batches]
            return float(np.mean(losses)) if losses else float("nan")

        self._predict = tf.function(lambda x: self.network.logits(self.network(x, training=False)[:, -1]),
                                    input_signature=[spec])
        evaluate = None
        if validation is not None and len(validation):
            popularity = train.item_counts()
            evaluate = lambda: validation_metric(self, validation, popularity, p["monitor"])  # noqa: E731
        self.epochs_kept = run_epochs(self.name, run_epoch, p["epochs"], self.network, evaluate, p["patience"],
                                      p["monitor"], p["min_epochs"])

    def tuned_params(self) -> dict:
        return {**self.params, "epochs": int(self.epochs_kept)}

    def score(self, queries: Queries, start: int, stop: int) -> np.ndarray:
        sequences = query_sequences(queries.history[start:stop], self.params["max_len"])
        return self._predict(tf.constant(sequences)).numpy().astype(np.float32)
