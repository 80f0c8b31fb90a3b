"""pandas frames to tf.data pipelines with the dtypes the models expect."""

from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf

from features.history import HISTORY, history_matrix
from features.schema import DEFAULT_SCHEMA, FeatureSchema
from features.user_stats import NEGATIVE_HISTORY


def frame_to_tensors(frame: pd.DataFrame, columns: tuple[str, ...],
                     schema: FeatureSchema = DEFAULT_SCHEMA) -> dict[str, np.ndarray]:
    """Columns as numpy arrays in model dtypes: int64 ints, float32 labels, str objects (a missing
    string is "", the value a serving request carries for it)."""
    schema.require_columns(frame, columns, "frame_to_tensors")
    out = {}
    for name in columns:
        dtype = schema.model_dtype(name)
        col = frame[name]
        if name in (HISTORY, NEGATIVE_HISTORY):  # a sequence per row -> [n, N] strings
            out[name] = history_matrix(col, len(col.iloc[0]) if len(col) else 0)
        elif dtype == np.dtype("object"):
            # Missing is "" in training as in a serving request (`serving.contract.PAD_AD_ID`): never "nan"/"None".
            out[name] = col.astype(object).where(col.notna(), "").astype(str).to_numpy(dtype=object)
        else:
            out[name] = col.to_numpy(dtype=dtype)
    return out


def make_dataset(frame: pd.DataFrame, columns: tuple[str, ...], batch_size: int,
                 shuffle: bool = False, seed: int = 0, repeat: bool = False,
                 drop_remainder: bool = False,
                 schema: FeatureSchema = DEFAULT_SCHEMA) -> tf.data.Dataset:
    """A batched dataset of feature dicts.

    The auto-shard policy is DATA: an in-memory dataset has no files to shard, and OFF
    would make every worker of a multi-worker job train on the same rows.
    """
    ds = tf.data.Dataset.from_tensor_slices(frame_to_tensors(frame, columns, schema))
    if shuffle:
        ds = ds.shuffle(min(len(frame), 100_000), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    # No autotuning: on 2 CPU cores its model thread was seen to deadlock the destruction of an
    # epoch's iterator (fit hung for good between epochs); a fixed prefetch costs nothing here.
    options.autotune.enabled = False
    return ds.with_options(options).prefetch(2)
