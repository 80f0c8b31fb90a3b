"""Loss scaling under `training.mixed_precision: mixed_float16`.

Under that policy Keras' `compile` wraps the optimizer in a `LossScaleOptimizer`, whose point is to
multiply the loss by a large factor before the backward pass (so small float16 gradients do not
flush to zero) and divide the gradients by it afterwards. Keras' own train step does both through
`optimizer.minimize`; TFRS's train step calls `tape.gradient` and `apply_gradients` directly, so
the loss was never scaled and the wrapper only skipped steps with inf/NaN gradients.
`ScaledLossModel` is `tfrs.Model` with the scaling done. Under any other policy the optimizer is a
plain one and the step is TFRS's, unchanged.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

LossScaleOptimizer = tf.keras.mixed_precision.LossScaleOptimizer


def scaled_loss(optimizer, loss: tf.Tensor) -> tf.Tensor:
    """`loss` times the optimizer's current loss scale (call it inside the gradient tape); `loss` itself
    for a plain optimizer."""
    return optimizer.get_scaled_loss(loss) if isinstance(optimizer, LossScaleOptimizer) else loss


def unscaled_gradients(optimizer, grads: list) -> list:
    """The gradients of `scaled_loss` divided by the same scale (None entries kept)."""
    return optimizer.get_unscaled_gradients(grads) if isinstance(optimizer, LossScaleOptimizer) else grads


def _finite(grads) -> tf.Tensor:
    values = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads]
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values])


def _poisoned(grad, poison):
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values + tf.cast(poison, grad.values.dtype), grad.indices, grad.dense_shape)
    return grad + tf.cast(poison, grad.dtype)


def apply_together(scaler, first: list, second, second_pairs: list) -> None:
    """One step of two optimizers over one scaled backward pass: `scaler` (a `LossScaleOptimizer`) on the
    (gradient, variable) pairs `first`, the plain `second` (the trainable encoder's own Adam) on
    `second_pairs`. Both step or neither: the loss scale starts high and is lowered after an overflow,
    and an overflowing step's inf/NaN gradients must not reach either optimizer. The wrapper decides (and
    moves its scale) from the gradients it is given, so an overflow in `second_pairs` alone is passed
    on to it as a NaN in one of `first`'s gradients. Gradients are summed over replicas first, so every
    replica takes the same branch."""
    first = scaler.inner_optimizer.aggregate_gradients([(g, v) for g, v in first if g is not None])
    second_pairs = second.aggregate_gradients([(g, v) for g, v in second_pairs if g is not None])
    finite = _finite([g for g, _ in (*first, *second_pairs)])
    if first:
        poison = tf.where(finite, 0.0, float("nan"))
        first = [(_poisoned(first[0][0], poison), first[0][1]), *first[1:]]
        scaler.apply_gradients(first, skip_gradients_aggregation=True)
    if second_pairs:
        def step():
            second.apply_gradients(second_pairs, skip_gradients_aggregation=True)
            return tf.constant(True)

        tf.cond(finite, step, lambda: tf.constant(False))


class ScaledLossModel(tfrs.Model):
    """`tfrs.Model` whose train step scales the loss when the compiled optimizer is a
    `LossScaleOptimizer`. Subclasses that split the gradients between optimizers override
    `_apply_gradients`."""

    def train_step(self, features):
        with tf.GradientTape() as tape:
            loss = self.compute_loss(features, training=True)
            regularization_loss = tf.reduce_sum([tf.reduce_sum(x) for x in self.losses])
            total_loss = loss + regularization_loss
            scaled = scaled_loss(self.optimizer, total_loss)
        variables = self.trainable_variables
        self._apply_gradients(unscaled_gradients(self.optimizer, tape.gradient(scaled, variables)), variables)
        metrics = {metric.name: metric.result() for metric in self.metrics}
        metrics.update(loss=loss, regularization_loss=regularization_loss, total_loss=total_loss)
        return metrics

    def _apply_gradients(self, grads, variables) -> None:
        """One step of the compiled optimizer."""
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
