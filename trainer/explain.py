"""Why the ranking model scored an ad as it did, computed inside the served graphs with core ops.

Two answers per scored row, both in units of the served CTR logit (before calibration, which is
monotone):

- `because_ad_ids` / `because_weights` [rows, EXPLAINED_HISTORY]: the `history` ads whose removal
  lowers the logit most, and by how much. Exact leave-one-out, not an approximation: for each
  history entry the pooled history is recomputed without it (its weighted vector out of the sum, its
  count out of the denominator, one less in the length) and the cross network runs again. So removing
  that ad from the request and scoring again gives the same drop. This holds for mean pooling and for
  target attention alike, because an entry's attention weight depends only on that entry and the
  candidate: removing one entry does not move the others' weights. A negative weight is an ad that
  pulls the score down. The id is "" (weight 0) where the history has fewer entries.
- `group_contributions` [rows, len(EXPLANATION_GROUPS)]: per feature group, the logit minus the
  logit with that group's columns of the cross network's input set to their training average
  (`reference`): how far this request's user (context, ad, ...) moves the score from an average one.
  One group at a time, so with the network's interactions they need not add up to the logit. A group
  the model does not read contributes 0.

Cost: the cross network and deep tower run on rows x (N + groups) extra inputs (N the history width).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf

from features.dataset import frame_to_tensors
from features.schema import FeatureSchema
from serving.contract import (
    BECAUSE_AD_IDS,
    BECAUSE_WEIGHTS,
    EXPLAINED_HISTORY,
    EXPLANATION_GROUPS,
    GROUP_CONTRIBUTIONS,
    HISTORY,
    PAD_AD_ID,
)
from trainer.ranking import RankingModel

REFERENCE_ROWS = 2048  # training rows averaged into the reference input


def reference_input(ranking: RankingModel, rows: pd.DataFrame, schema: FeatureSchema) -> np.ndarray:
    """The average cross-network input x0 over (up to REFERENCE_ROWS of) `rows`, the training rows: the
    baseline `group_contributions` replaces a group's columns with."""
    rows = rows.head(REFERENCE_ROWS)
    if not len(rows):
        raise ValueError("reference_input: no training rows to average")
    features = frame_to_tensors(rows, ranking.feature_names, schema)
    x0 = ranking.cross_input(ranking.input_parts(features))
    return tf.reduce_mean(tf.cast(x0, tf.float32), axis=0).numpy()


def groups_read(ranking: RankingModel) -> set[str]:
    """The feature groups the model's input has columns of (the others contribute 0)."""
    return {ranking.group_of(n) for n in ranking.embeddings.names} | {"ad_text", *ranking.histories}


def explain(ranking: RankingModel, features, reference: np.ndarray | None) -> dict[str, tf.Tensor]:
    """The explanation outputs for the rows of `features` (what `ranking.logits` reads, `text_embedding`
    included when given). `reference`: `reference_input`'s vector; None is the zero vector."""
    return scored_and_explained(ranking, features, reference)[1]


def scored_and_explained(ranking: RankingModel, features, reference: np.ndarray | None
                         ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
    """(`ranking.serve_probabilities(features)`, `explain(...)`) from one pass of the network over the
    rows: the explanations start from the same input and logits the scores are calibrated from."""
    parts = ranking.input_parts(features)
    x0 = ranking.cross_input(parts)
    both = ranking.interact(x0)
    logit = tf.cast(both[:, 0], tf.float32)
    why = {**_because(ranking, features, parts, logit),
           GROUP_CONTRIBUTIONS: _group_contributions(ranking, parts, x0, logit, reference)}
    return ranking.calibrated({"ctr": both[:, 0], "cvr": both[:, 1]}), why


def _group_contributions(ranking: RankingModel, parts, x0, logit, reference) -> tf.Tensor:
    groups = [g for g, _ in parts]
    widths = [int(p.shape[-1]) for _, p in parts]
    width = sum(widths)
    if reference is not None and np.shape(reference) != (width,):
        raise ValueError(f"explain: reference has shape {np.shape(reference)}, the model's input {width} columns")
    base = np.zeros(width, np.float32) if reference is None else np.asarray(reference, np.float32)
    read = [g for g in EXPLANATION_GROUPS if g in groups]
    masks = np.stack([np.concatenate([np.full(w, g == name) for g, w in zip(groups, widths, strict=True)])
                      for name in read])  # [G', width]
    occluded = tf.where(tf.constant(masks)[:, None, :], tf.cast(tf.constant(base), x0.dtype)[None, None, :],
                        x0[None])  # [G', rows, width]
    moved = tf.reshape(tf.cast(ranking.interact(tf.reshape(occluded, [-1, width]))[:, 0], tf.float32),
                       [len(read), -1])
    columns = [logit - moved[read.index(g)] if g in read else tf.zeros_like(logit) for g in EXPLANATION_GROUPS]
    return tf.stack(columns, axis=1)


def _because(ranking: RankingModel, features, parts, logit) -> dict[str, tf.Tensor]:
    rows = tf.shape(logit)[0]
    if HISTORY not in ranking.histories:  # the model reads no clicks: nothing to name
        return {BECAUSE_AD_IDS: tf.fill([rows, EXPLAINED_HISTORY], PAD_AD_ID),
                BECAUSE_WEIGHTS: tf.zeros([rows, EXPLAINED_HISTORY])}
    history = features[HISTORY]  # [rows, N]
    n = ranking.history_length
    terms = ranking.history_terms(history, ranking.candidate_text(features), ranking.history_attention.get(HISTORY),
                                  clicked=True)
    count = tf.reduce_sum(terms["known"], axis=1, keepdims=True)  # [rows, 1]
    total = tf.cast(terms["pooled"], tf.float32) * ranking.pool_divisor(count)  # the weighted sum the pool divided
    without = (total[:, None, :] - terms["weights"][:, :, None] * terms["vectors"]) / ranking.pool_divisor(
        count - terms["known"])[:, :, None]  # [rows, N, d]: entry i's pool without entry i
    present = tf.not_equal(history, PAD_AD_ID)
    length = terms["length"][:, None, :] - tf.cast(present, tf.float32)[:, :, None]
    mass = ranking.weight_mass(tf.reduce_sum(terms["weights"], axis=1, keepdims=True) - terms["weights"],
                               count - terms["known"])[:, :, None]  # [rows, N, 1]: the mean weight without entry i
    replaced = iter(ranking.history_parts(without, terms["unit_text"][:, None, :], length, mass))
    dtype = parts[0][1].dtype
    pieces = [tf.cast(next(replaced) if g == HISTORY else tf.repeat(p[:, None, :], n, axis=1), dtype)
              for g, p in parts]
    x = tf.concat(pieces, axis=-1)
    left_out = tf.reshape(tf.cast(ranking.interact(tf.reshape(x, [-1, x.shape[-1]]))[:, 0], tf.float32), [-1, n])
    drop = logit[:, None] - left_out  # [rows, N]
    top = tf.math.top_k(tf.where(present, drop, float("-inf")), k=min(EXPLAINED_HISTORY, n))
    chosen = tf.gather(present, top.indices, batch_dims=1)
    ids = tf.where(chosen, tf.gather(history, top.indices, batch_dims=1), PAD_AD_ID)
    weights = tf.where(chosen, top.values, 0.0)
    if n < EXPLAINED_HISTORY:  # a history narrower than the output: pad its columns
        ids = tf.pad(ids, [[0, 0], [0, EXPLAINED_HISTORY - n]], constant_values=PAD_AD_ID)
        weights = tf.pad(weights, [[0, 0], [0, EXPLAINED_HISTORY - n]])
    return {BECAUSE_AD_IDS: ids, BECAUSE_WEIGHTS: weights}
