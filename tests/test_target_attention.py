"""The DIN activation unit's variants (`ranking.attention_*`), on small random tensors."""

import numpy as np
import pytest
import tensorflow as tf

from trainer.towers import TargetAttention


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    history = tf.constant(rng.normal(size=(3, 5, 8)).astype(np.float32))
    present = tf.constant([[True] * 5, [True, True, False, False, False], [False] * 5])
    candidates = tf.constant(rng.normal(size=(3, 8)).astype(np.float32))
    return history, candidates, present


def _perturb(unit: TargetAttention, seed: int = 1) -> None:
    """Move every weight off its initial value (the output layer starts at zero)."""
    rng = np.random.default_rng(seed)
    for v in unit.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype(np.float32))


def test_sum_scale_starts_as_the_sum_and_keeps_the_history_s_strength():
    history, candidates, present = _inputs()
    unit = TargetAttention(units=(6, 4), scale="sum")
    summary, weights = unit(history, candidates, present)
    mask = present.numpy()[:, :, None].astype(np.float32)
    np.testing.assert_allclose(summary.numpy(), (history.numpy() * mask).sum(1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(weights.numpy(), mask[:, :, 0])
    _perturb(unit)
    summary, weights = unit(history, candidates, present)
    expected = (weights.numpy()[:, :, None] * history.numpy()).sum(1)  # not divided by the count
    np.testing.assert_allclose(summary.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(weights.numpy()[~present.numpy()], 0.0)
    mean_unit = TargetAttention(units=(6, 4), scale="mean")
    mean_unit(history, candidates, present)
    for a, b in zip(mean_unit.trainable_variables, unit.trainable_variables, strict=True):
        a.assign(b)
    mean_summary, mean_weights = mean_unit(history, candidates, present)
    np.testing.assert_allclose(mean_weights.numpy(), weights.numpy(), rtol=1e-6)
    np.testing.assert_allclose(mean_summary.numpy()[1], summary.numpy()[1] / 2, rtol=1e-5, atol=1e-6)


def test_weights_come_from_the_keys_and_query_the_summary_from_the_history():
    history, candidates, present = _inputs()
    unit = TargetAttention(units=4)
    keys = tf.constant(np.random.default_rng(2).normal(size=(3, 5, 3)).astype(np.float32))
    query = tf.constant(np.random.default_rng(3).normal(size=(3, 3)).astype(np.float32))
    unit(history, candidates, present, keys, query)
    _perturb(unit)
    summary, weights = unit(history, candidates, present, keys, query)
    assert unit.hidden[0].kernel.shape == (4 * 3, 4)  # [k, q, k * q, k - q] of the 3-wide keys
    np.testing.assert_allclose(summary.numpy()[0], (weights.numpy()[0][:, None] * history.numpy()[0]).sum(0) / 5,
                               rtol=1e-5, atol=1e-5)
    _, other = unit(history, candidates, present, keys, -query)
    assert not np.allclose(other.numpy()[0], weights.numpy()[0])  # another candidate, other weights


def test_dropout_only_in_training():
    history, candidates, present = _inputs()
    unit = TargetAttention(units=(16,), dropout=0.5)
    unit(history, candidates, present)
    _perturb(unit)
    served = [unit(history, candidates, present)[1].numpy() for _ in range(2)]
    np.testing.assert_array_equal(served[0], served[1])
    tf.keras.utils.set_random_seed(0)
    trained = unit(history, candidates, present, training=True)[1].numpy()
    assert not np.allclose(trained[0], served[0][0])
    np.testing.assert_array_equal(trained[~present.numpy()], 0.0)


def test_config_round_trip_and_refusals():
    unit = TargetAttention(units=(8, 4), dropout=0.2, scale="sum", name="a")
    again = TargetAttention.from_config(unit.get_config())
    assert [h.units for h in again.hidden] == [8, 4] and again.dropout.rate == 0.2 and again.scale == "sum"
    with pytest.raises(ValueError, match="scale"):
        TargetAttention(scale="softmax")
    with pytest.raises(ValueError, match="units"):
        TargetAttention(units=())
    with pytest.raises(ValueError, match="dropout"):
        TargetAttention(dropout=1.0)
