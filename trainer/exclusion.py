"""Which retrieved candidates a recommender request excludes, decided inside the exported graph.

A request's `excluded_ad_ids` [batch, M] (padded with "") become catalog rows through a hash table
(unknown ids and the pad become -1), sorted per request. A candidate row is excluded when a binary
search finds it in its request's sorted rows: B x fetch x log M work, never a [batch, catalog]
mask or a string comparison per (candidate, excluded id) pair, so the cost stays flat for a
million-ad catalog. Core TensorFlow ops only (TF Serving links them).
"""

from __future__ import annotations

import tensorflow as tf

from serving.contract import PAD_AD_ID

NOT_IN_CATALOG = -1  # what an unknown id or the pad maps to; no candidate row is negative


class CatalogRows(tf.Module):
    """Ad id -> catalog row (int32), NOT_IN_CATALOG for anything else."""

    def __init__(self, ad_ids: list[str], name: str = "catalog_rows"):
        super().__init__(name=name)
        if PAD_AD_ID in ad_ids:
            raise ValueError(f"the catalog lists the ad id {PAD_AD_ID!r}, which requests use as padding")
        if len(set(ad_ids)) != len(ad_ids):
            raise ValueError("the catalog lists an ad id twice; a recommender cannot tell which row it excludes")
        init = tf.lookup.KeyValueTensorInitializer(tf.constant(ad_ids, tf.string),
                                                   tf.range(len(ad_ids), dtype=tf.int64))
        self.table = tf.lookup.StaticHashTable(init, default_value=NOT_IN_CATALOG)

    def sorted_rows(self, ad_ids: tf.Tensor) -> tf.Tensor:
        """[batch, M] ad ids -> [batch, M + 1] their rows, ascending per request, led by one
        NOT_IN_CATALOG (so a request listing nothing, M = 0, still has a row to search)."""
        rows = tf.cast(self.table.lookup(ad_ids), tf.int32)
        lead = tf.fill([tf.shape(rows)[0], 1], NOT_IN_CATALOG)
        return tf.sort(tf.concat([lead, rows], axis=1), axis=1)


def distinct_known(sorted_rows: tf.Tensor) -> tf.Tensor:
    """[batch]: how many distinct catalog ads each request excludes (duplicates and unknown ids
    remove no candidate, so they cost no over-fetch)."""
    new = tf.logical_and(tf.not_equal(sorted_rows[:, 1:], sorted_rows[:, :-1]), sorted_rows[:, 1:] >= 0)
    return tf.reduce_sum(tf.cast(new, tf.int32), axis=1)


def is_excluded(sorted_rows: tf.Tensor, candidates: tf.Tensor) -> tf.Tensor:
    """[batch, fetch] bool: whether each candidate row is in its own request's sorted rows."""
    at = tf.searchsorted(sorted_rows, candidates, side="left")
    at = tf.minimum(at, tf.shape(sorted_rows)[1] - 1)
    return tf.equal(tf.gather(sorted_rows, at, batch_dims=1), candidates)


def first_allowed(allowed: tf.Tensor, n: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Each request's first `n` allowed columns, in order: ([batch, n] column indices, [batch, n]
    whether that slot holds an allowed column; False slots, when fewer are allowed, are filler).
    Needs n <= fetch."""
    fetch = tf.shape(allowed)[1]
    earlier_first = tf.where(allowed, fetch - tf.range(fetch)[None, :], 0)  # allowed: >= 1, larger first
    top = tf.math.top_k(earlier_first, k=n)
    return top.indices, top.values > 0
