"""Differentially private training of the retrieval model (DP-SGD, Abadi et al. 2016) and its accountant.

Each step takes every training row's own gradient, clips it to `l2_clip` in L2 norm (the query
tower's weights and the row's gradient with respect to the catalog's ad embeddings, jointly), sums
the clipped gradients, adds Gaussian noise of standard deviation `noise_multiplier * l2_clip` to
every coordinate and divides by the batch size. The ad tower's weights are updated by pushing the
noised ad-embedding gradient back through the ad tower: it reads only the catalog (public), so that
is post-processing of a private release, and both towers are covered. The loss must be the full
softmax over the catalog: a row's loss then depends on that row alone (an in-batch softmax makes
every row a negative of the others, and one row's gradient is no longer bounded by its own clip).

Per-row gradients come from `tf.vectorized_map` over the query tower. It needs two converters
TensorFlow does not ship (vocabulary lookups and embedding-variable gathers inside the loop):
both are elementwise in their stacked input and are registered when DP training first runs;
`per_row_gradients` is tested against one gradient per row computed on its own.

The accountant is the Renyi-DP accountant of the `dp-accounting` package for the Poisson-sampled
Gaussian mechanism, with sampling rate batch_size / training rows, as is usual for shuffled
fixed-size batches (docs/training.md#differential-privacy says what is and is not covered).
"""

from __future__ import annotations

import math

import tensorflow as tf

from trainer.config import DPConfig


def _register_converters() -> None:
    """pfor converters for the two ops the query tower uses that TensorFlow's pfor cannot vectorise.

    Both read a loop-invariant resource (a lookup table, an embedding variable) with loop-varying
    keys, elementwise, so the vectorised op is the same op on the stacked keys. TensorFlow offers no
    public way to add one, so this reaches into its pfor module; only DP training calls it, and
    `tests/test_privacy_dp.py` checks the result against per-row gradients taken one by one."""
    from tensorflow.python.ops import gen_lookup_ops, gen_resource_variable_ops
    from tensorflow.python.ops.parallel_for import pfor as _pfor

    registered = _pfor._pfor_converter_registry
    if "LookupTableFindV2" not in registered:
        @_pfor.RegisterPFor("LookupTableFindV2")
        def _lookup(pfor_input):
            table = pfor_input.unstacked_input(0)
            keys = pfor_input.input(1)
            default = pfor_input.unstacked_input(2)
            return _pfor.wrap(gen_lookup_ops.lookup_table_find_v2(table, keys.t, default), keys.is_stacked)

    if "ResourceGather" not in registered:
        @_pfor.RegisterPFor("ResourceGather")
        def _gather(pfor_input):
            if pfor_input.get_attr("batch_dims") != 0:
                raise ValueError("privacy.dp: an embedding gather with batch_dims cannot be vectorised")
            resource = pfor_input.unstacked_input(0)
            indices = pfor_input.input(1)  # loop-invariant indices (a constant gather) stay unstacked
            return _pfor.wrap(gen_resource_variable_ops.resource_gather(
                resource, indices.t, dtype=pfor_input.get_attr("dtype"),
                validate_indices=pfor_input.get_attr("validate_indices")), indices.is_stacked)


def dp_epsilon(steps: int, sampling_rate: float, noise_multiplier: float, delta: float) -> float:
    """Epsilon at `delta` after `steps` Poisson-sampled Gaussian steps (RDP accountant)."""
    from absl import logging as absl_logging
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    if steps <= 0:
        return 0.0
    accountant = rdp_privacy_accountant.RdpAccountant()
    # At large sampling rates some fractional orders' series do not converge: the package drops those
    # orders (the bound stays valid, from the others) and says so through absl at WARNING per order.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        accountant.compose(dp_event.PoissonSampledDpEvent(
            min(1.0, sampling_rate), dp_event.GaussianDpEvent(noise_multiplier)), int(steps))
        return float(accountant.get_epsilon(delta))
    finally:
        absl_logging.set_verbosity(verbosity)


def check_delta(dp: DPConfig, n_rows: int) -> None:
    """delta is the chance the guarantee fails outright; at 1/N or more it may fail for a whole row."""
    if dp.delta >= 1.0 / max(n_rows, 1):
        raise ValueError(f"privacy.dp.delta {dp.delta:g} is not below 1 / training rows (1/{n_rows:,d}); "
                         "choose a smaller delta")


def per_row_gradients(row_loss, variables: list[tf.Variable], rows) -> tuple[list, object]:
    """Each row's gradient of `row_loss(one_row) -> (loss [1], extra)` with respect to `variables`,
    vectorised over the rows of `rows` (a nest of tensors sharing their first dimension; each
    tensor reaches `row_loss` as a batch of one).

    Returns per variable either a dense [rows, *shape] tensor, or for an embedding gather the pair
    (values [rows, n, dim], indices [rows, n]) of the rows it touched; and the stacked extras."""
    _register_converters()

    def one(row):
        single = tf.nest.map_structure(lambda v: v[None], row)
        with tf.GradientTape() as tape:
            loss, extra = row_loss(single)
            loss = tf.reduce_sum(loss)
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        flat = []
        for g in grads:
            if isinstance(g, tf.IndexedSlices):
                flat.append((g.values, tf.cast(g.indices, tf.int64)))
            else:
                flat.append(g)
        return flat, extra

    return tf.vectorized_map(one, rows, fallback_to_while_loop=False)


def squared_norms(grads: list) -> tf.Tensor:
    """[rows] squared L2 norm of each row's gradient. For a gather's (values, indices), rows that hit the
    same index add up before the norm (sum over pairs of equal indices of their values' dot products)."""
    total = 0.0
    for g in grads:
        if isinstance(g, tuple):
            values, indices = g
            values = tf.reshape(values, [tf.shape(values)[0], -1, tf.shape(values)[-1]])
            indices = tf.reshape(indices, [tf.shape(indices)[0], -1])
            same = tf.cast(tf.equal(indices[:, :, None], indices[:, None, :]), values.dtype)
            total += tf.reduce_sum(same * tf.matmul(values, values, transpose_b=True), axis=[1, 2])
        else:
            total += tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)
    return total


def clipped_noised_sum(grads: list, scale: tf.Tensor, variables: list[tf.Variable], stddev: float,
                       denominator: float) -> list[tf.Tensor]:
    """Per variable: sum over rows of scale[row] * gradient, plus N(0, stddev^2) on every coordinate,
    over `denominator`. Gathered gradients are scattered into the whole table first, so every row of
    an embedding table gets noise, touched or not."""
    out = []
    for g, var in zip(grads, variables, strict=True):
        if isinstance(g, tuple):
            values, indices = g
            dim = tf.shape(values)[-1]
            values = tf.reshape(values * tf.reshape(scale, [-1] + [1] * (len(values.shape) - 1)), [-1, dim])
            summed = tf.math.unsorted_segment_sum(values, tf.reshape(indices, [-1]), tf.shape(var)[0])
        else:
            summed = tf.tensordot(scale, g, axes=1)
        noise = tf.random.normal(tf.shape(summed), stddev=stddev, dtype=summed.dtype)
        out.append((summed + noise) / denominator)
    return out


class EpsilonLogger(tf.keras.callbacks.Callback):
    """Puts the epsilon spent so far (`dp_epsilon`, at the configured delta) into each epoch's logs."""

    def __init__(self, dp: DPConfig, sampling_rate: float):
        super().__init__()
        self.dp = dp
        self.sampling_rate = sampling_rate

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            steps = int(self.model.optimizer.iterations.numpy())
            logs["dp_epsilon"] = dp_epsilon(steps, self.sampling_rate, self.dp.noise_multiplier, self.dp.delta)


def privacy_report(dp: DPConfig, steps: int, n_rows: int, batch_size: int) -> dict:
    """What a DP training spent and what the number covers (the job's metrics, `privacy.dp`)."""
    rate = batch_size / n_rows
    eps = dp_epsilon(steps, rate, dp.noise_multiplier, dp.delta)
    return {"epsilon": eps if math.isfinite(eps) else None, "delta": dp.delta,
            "noise_multiplier": dp.noise_multiplier, "l2_clip": dp.l2_clip, "steps": steps,
            "sampling_rate": rate, "training_rows": n_rows,
            "unit": "one training row (a positive pair); a user with m rows is covered at group level m",
            "covers": "retrieval: query tower and ad tower weights (ranking is not trained under privacy.dp)",
            "accountant": "Renyi DP, Poisson-sampled Gaussian (dp-accounting)"}
