"""training.mixed_precision mixed_float16: the train step scales the loss, so float16 gradients too small
for float16 still reach the weights, and a second optimizer (the encoder's) skips the steps the loss
scale overflows."""

import contextlib
import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tests.conftest import fewer_impressions, tiny_config
from trainer.loss_scaling import LossScaleOptimizer, ScaledLossModel, apply_together

TINY_LOSS = 1e-8  # d loss / d output: below float16's smallest subnormal (6e-8), so it flushes to zero unscaled


@pytest.fixture()
def float16_policy():
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


class _WarningsOf(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def scaling_warnings():
    """The TensorFlow warnings that say a LossScaleOptimizer's loss or gradients went unscaled."""
    handler = _WarningsOf()
    logging.getLogger("tensorflow").addHandler(handler)
    found: list[str] = []
    try:
        yield found
    finally:
        logging.getLogger("tensorflow").removeHandler(handler)
        found += [m for m in handler.messages if "get_scaled_loss" in m or "get_unscaled_gradients" in m]


def _one_step(base):
    class Linear(base):
        def __init__(self):
            super().__init__()
            self.dense = tf.keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")  # float16 compute

        def compute_loss(self, x, training=False):
            return TINY_LOSS * tf.cast(tf.reduce_sum(self.dense(x)), tf.float32)

    model = Linear()
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate=1e6))
    x = np.ones((4, 3), np.float32)
    model.fit(tf.data.Dataset.from_tensors(x), epochs=1, verbose=0)
    return model, x


def test_a_float16_gradient_below_float16_range_reaches_the_weights(float16_policy):
    with scaling_warnings() as unscaled_warnings:
        model, x = _one_step(ScaledLossModel)
    assert isinstance(model.optimizer, LossScaleOptimizer)  # compile wrapped it, as under any Keras model
    assert model.dense.compute_dtype == "float16"
    # d loss / d kernel = TINY_LOSS * (sum of x over the batch) per input; SGD at 1e6 moves it by that * 1e6.
    expected = 1.0 - 1e6 * TINY_LOSS * x.sum(axis=0)[:, None]
    np.testing.assert_allclose(model.dense.kernel.numpy(), expected, rtol=2e-3)
    assert not unscaled_warnings

    unscaled, _ = _one_step(tfrs.Model)  # TFRS's own step: the same gradient flushes to zero in float16
    np.testing.assert_array_equal(unscaled.dense.kernel.numpy(), np.ones((3, 1), np.float32))


def test_two_optimizers_over_one_scaled_loss_step_together_or_skip_together():
    towers, encoder = tf.Variable([1.0, 2.0]), tf.Variable([3.0])
    scaler = LossScaleOptimizer(tf.keras.optimizers.SGD(1.0))
    second = tf.keras.optimizers.Adam(0.1)

    def step(tower_grad, encoder_grad):
        apply_together(scaler, [(tf.constant(tower_grad), towers)], second, [(tf.constant(encoder_grad), encoder)])

    scale = float(scaler.loss_scale.numpy())
    for tower_grad, encoder_grad in (([0.5, np.inf], [1.0]), ([0.5, 0.5], [np.nan])):  # an overflow on either side
        step(tower_grad, encoder_grad)
        np.testing.assert_array_equal(towers.numpy(), [1.0, 2.0])
        np.testing.assert_array_equal(encoder.numpy(), [3.0])
        assert int(second.iterations.numpy()) == 0
        scale /= 2
        assert float(scaler.loss_scale.numpy()) == scale  # the wrapper saw the overflow and lowered its scale
    step([0.5, -0.5], [1.0])
    np.testing.assert_allclose(towers.numpy(), [0.5, 2.5])
    np.testing.assert_allclose(encoder.numpy(), [2.9], rtol=1e-5)  # Adam's first step: lr * sign
    assert int(second.iterations.numpy()) == 1 and float(scaler.loss_scale.numpy()) == scale


def test_a_float16_job_with_a_trainable_encoder_scales_its_loss_and_stays_finite(tmp_path):
    from trainer.job import run_training

    cfg = tiny_config(tmp_path, encoder={"mode": "lora", "lora_rank": 2, "fine_tune_learning_rate": 1e-3},
                      data=fewer_impressions(1500),
                      training={"mixed_precision": "mixed_float16"}, retrieval={"epochs": 2, "batch_size": 32},
                      ranking={"epochs": 1, "validation_fraction": 0.0}, evaluation={"baselines": ["most_popular"]})
    try:
        with scaling_warnings() as unscaled_warnings:
            trained = run_training(cfg, progress=False)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
        import keras

        keras.mixed_precision.set_global_policy("float32")
    assert not unscaled_warnings
    for model in (trained.retrieval, trained.ranking):
        assert isinstance(model.optimizer, LossScaleOptimizer)
        assert np.isfinite(float(model.optimizer.loss_scale.numpy()))
        assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
    # The scale starts at 2 ** 15 and halves at each overflow (it would double only after 2,000 finite
    # steps): the encoder's optimizer stepped exactly on the steps the towers' did not skip.
    retrieval = trained.retrieval.optimizer
    overflows = round(np.log2(2 ** 15 / float(retrieval.loss_scale.numpy())))
    steps = int(trained.retrieval.encoder_optimizer.iterations.numpy())
    assert steps > 0 and steps == int(retrieval.iterations.numpy()) - overflows
    adapters = [v for v in trained.text.adapter.backbone.trainable_variables if v.path.endswith("lora_kernel_b")]
    assert adapters and any(np.abs(v.numpy()).max() > 0 for v in adapters)  # the encoder's optimizer stepped
    assert all(np.isfinite(v.numpy()).all() for v in adapters)
