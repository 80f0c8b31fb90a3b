"""DP-SGD for the retrieval model (trainer/dp.py): per-row gradients, clipping, noise, the accountant, refusals."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import tiny_config

DP = {"dp": {"enabled": True}}


def _dp_model(tmp_path, **retrieval):
    """A tiny full-softmax retrieval model under DP (history with one attention layer), built, and a batch."""
    from pathlib import Path

    from trainer.builders import build_retrieval, build_text_assets
    from trainer.fit import build_model
    from trainer.inputs import retrieval_dataset
    from trainer.prepare import prepare_data, sampling_counts
    from trainer.text_encoder import encode_cached

    cfg = tiny_config(tmp_path, retrieval={"loss": "full_softmax", "history_attention_layers": 1,
                                           "exclude_history_from_loss": True, "batch_size": 16, **retrieval},
                      privacy=DP)
    strategy = tf.distribute.get_strategy()
    data = prepare_data(cfg, None, None, with_negatives=False)
    text = build_text_assets(cfg, data.catalog, data.schema, corpus_ad_ids=set(data.split.train[data.schema.ad_id]),
                             model_dir=Path(cfg.training.model_dir), progress=False)
    cached = encode_cached(text.adapter, text.packed_catalog, cfg.encoder.cache_dir, progress=False)
    model = build_retrieval(cfg, strategy, data.schema, data.vocabularies, data.catalog, text, cached,
                            sampling_counts(data.split.train, data.schema))
    ds, _ = retrieval_dataset(data.split.train, cfg, data.schema)
    batch = next(iter(ds))
    build_model(model, batch, strategy)
    return model, batch


@pytest.fixture(scope="module")
def dp_model(tmp_path_factory):
    return _dp_model(tmp_path_factory.mktemp("dp"))


def test_per_row_gradients_equal_each_rows_own_gradient(dp_model):
    """The DP step's own row loss (history masked, attention over the history), vectorised, against the
    ordinary loss of each row alone."""
    from trainer.dp import per_row_gradients, squared_norms

    model, batch = dp_model
    variables = model.query_tower.trainable_variables
    ads = model.ad_embedding(model.catalog_features)
    rows = {k: v[:6] for k, v in batch.items()}
    grads, _ = tf.function(lambda f: per_row_gradients(model._row_loss(ads, False), variables,
                                                       model._rows(f, ads)))(rows)
    norms = squared_norms(grads).numpy()
    assert any(isinstance(g, tuple) for g in grads), "the embedding tables' gradients stay gathered rows"
    for i in range(6):
        row = {k: v[i:i + 1] for k, v in rows.items()}
        with tf.GradientTape() as tape:
            logits, target = model._catalog_logits(model.query_tower(row, training=False), ads, row, False)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=logits))
        own = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        dense = [tf.convert_to_tensor(g) for g in own]
        assert norms[i] == pytest.approx(sum(float(tf.reduce_sum(g * g)) for g in dense), rel=1e-4)
        for g, mine, var in zip(grads, dense, variables, strict=True):
            if isinstance(g, tuple):  # scatter the row's gathered gradient into the table, as the step does
                values, indices = g[0][i], g[1][i]
                mine_rows = tf.math.unsorted_segment_sum(tf.reshape(values, [-1, values.shape[-1]]),
                                                         tf.reshape(indices, [-1]), var.shape[0])
                np.testing.assert_allclose(mine_rows.numpy(), mine.numpy(), rtol=1e-4, atol=1e-6)
            else:
                np.testing.assert_allclose(g[i].numpy(), mine.numpy(), rtol=1e-4, atol=1e-6)


def test_squared_norms_add_up_rows_that_hit_the_same_index():
    from trainer.dp import squared_norms

    values = tf.constant([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])  # one row; indices 5, 5, 7
    indices = tf.constant([[5, 5, 7]], tf.int64)
    dense = tf.constant([[1.0, 2.0]])
    # table row 5 gets [3, 0], row 7 gets [0, 3]: 9 + 9; the dense part 1 + 4
    assert float(squared_norms([(values, indices), dense])[0]) == pytest.approx(23.0)


def test_clipped_noised_sum_scales_scatters_and_noises_every_coordinate():
    from trainer.dp import clipped_noised_sum

    table = tf.Variable(tf.zeros([4, 2]))
    dense = tf.Variable(tf.zeros([3]))
    gathered = (tf.constant([[[1.0, 1.0]], [[2.0, 2.0]]]), tf.constant([[1], [1]], tf.int64))
    per_row = tf.constant([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = clipped_noised_sum([gathered, per_row], tf.constant([1.0, 0.5]), [table, dense], 0.0, 2.0)
    np.testing.assert_allclose(out[0].numpy(), [[0, 0], [1, 1], [0, 0], [0, 0]])  # (1 + 0.5 * 2) / 2
    np.testing.assert_allclose(out[1].numpy(), [0.5, 0.25, 0.0])
    big = tf.Variable(tf.zeros([200, 50]))
    tf.random.set_seed(0)
    noised = clipped_noised_sum([(tf.zeros([1, 1, 50]), tf.zeros([1, 1], tf.int64))], tf.constant([1.0]),
                                [big], 3.0, 2.0)[0].numpy()
    assert np.all(noised != 0), "untouched table rows get noise too"
    assert noised.std() == pytest.approx(1.5, rel=0.05)


def test_a_private_step_without_clipping_or_noise_is_the_ordinary_gradient(tmp_path):
    """With a clip no row reaches and (almost) no noise, the DP step moves both towers as plain SGD on the
    mean full-softmax loss: the per-row path, the rank-one ad-embedding gradient and its push through the
    ad tower add up to the ordinary gradient."""
    from trainer.config import DPConfig

    model, batch = _dp_model(tmp_path, batch_size=16)
    model.dp = DPConfig(enabled=True, l2_clip=1e6, noise_multiplier=1e-12)
    model.optimizer = tf.keras.optimizers.SGD(learning_rate=1.0)
    variables = model.query_tower.trainable_variables + model.ad_tower.trainable_variables
    before = [v.numpy().copy() for v in variables]
    with tf.GradientTape() as tape:
        loss = model._full_softmax_loss(batch, training=True)
    expected = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, variables)]
    metrics = model._private_train_step(batch)
    assert float(metrics["clipped"]) == 0.0
    for b, v, g in zip(before, variables, expected, strict=True):
        np.testing.assert_allclose(b - v.numpy(), g, rtol=2e-3, atol=2e-6, err_msg=v.name)


def test_a_private_step_clips_every_row_to_the_clip(tmp_path):
    """Clip far below every row's norm, no noise: the update is sum_i C g_i / |g_i| over the batch size,
    whose norm is at most C (the triangle inequality), whatever the rows' own norms."""
    from trainer.config import DPConfig

    model, batch = _dp_model(tmp_path, batch_size=16)
    model.dp = DPConfig(enabled=True, l2_clip=1e-3, noise_multiplier=1e-12)
    model.optimizer = tf.keras.optimizers.SGD(learning_rate=1.0)
    variables = model.query_tower.trainable_variables + model.ad_tower.trainable_variables
    query_vars = model.query_tower.trainable_variables
    before = [v.numpy().copy() for v in variables]
    metrics = model._private_train_step(batch)
    assert float(metrics["clipped"]) == 1.0
    moved = zip(before[:len(query_vars)], query_vars, strict=True)  # the query tower's variables come first
    query_step = math.sqrt(sum(float(np.sum((b - v.numpy()) ** 2)) for b, v in moved))
    assert 0 < query_step <= 1e-3 * 1.0001


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    from trainer.dp import dp_epsilon

    base = dp_epsilon(300, 0.01, 1.0, 1e-6)
    assert 0 < base < dp_epsilon(600, 0.01, 1.0, 1e-6)
    assert dp_epsilon(300, 0.01, 2.0, 1e-6) < base < dp_epsilon(300, 0.01, 0.7, 1e-6)
    assert dp_epsilon(0, 0.01, 1.0, 1e-6) == 0.0
    # One full-batch Gaussian step: epsilon is at most the classical bound sqrt(2 ln(1.25/delta)) / sigma.
    assert dp_epsilon(1, 1.0, 5.0, 1e-5) <= math.sqrt(2 * math.log(1.25 / 1e-5)) / 5.0


@pytest.mark.parametrize("key, value, names", [
    ("retrieval", {"loss": "in_batch"}, "retrieval.loss"),
    ("retrieval", {"loss": "full_softmax", "full_softmax_negatives": "seen"}, "full_softmax_negatives"),
    ("training", {"mixed_precision": "mixed_bfloat16"}, "training.mixed_precision"),
    ("training", {"strategy": "mirrored"}, "training.strategy"),
    ("evaluation", {"validation_fraction": 0.1}, "evaluation.validation_fraction"),
])
def test_dp_refuses_what_its_epsilon_would_not_cover(tmp_path, key, value, names):
    overrides = {"retrieval": {"loss": "full_softmax"}, "privacy": DP}
    overrides[key] = {**overrides.get(key, {}), **value}
    with pytest.raises(ValueError, match=names.replace(".", r"\.")):
        tiny_config(tmp_path, **overrides)


def test_dp_job_refuses_ranking_export_warm_start_and_a_large_delta(tmp_path):
    from trainer.job import run_training
    from trainer.task import train_and_export

    cfg = tiny_config(tmp_path, retrieval={"loss": "full_softmax"}, privacy=DP)
    with pytest.raises(ValueError, match="--no-export"):
        train_and_export(cfg, export=True, progress=False)
    with pytest.raises(ValueError, match="ranking stage"):
        run_training(cfg, progress=False)
    with pytest.raises(ValueError, match="warm start"):
        run_training(cfg, progress=False, with_ranking=False, warm_start=tmp_path)
    big = tiny_config(tmp_path, retrieval={"loss": "full_softmax"}, privacy={"dp": {"enabled": True, "delta": 0.01}})
    with pytest.raises(ValueError, match="privacy.dp.delta"):
        run_training(big, progress=False, with_ranking=False)


def test_a_dp_job_reports_the_epsilon_its_steps_spent(tmp_path):
    from trainer.dp import dp_epsilon
    from trainer.job import run_training

    cfg = tiny_config(tmp_path, retrieval={"loss": "full_softmax", "epochs": 2},
                      privacy={"dp": {"enabled": True, "noise_multiplier": 1.5}})
    trained = run_training(cfg, progress=False, with_ranking=False)
    report = trained.metrics["privacy"]["dp"]
    assert report["steps"] == trained.metrics["train_steps"]["retrieval"] > 0
    rate = cfg.retrieval.batch_size / report["training_rows"]
    assert report["epsilon"] == pytest.approx(dp_epsilon(report["steps"], rate, 1.5, cfg.privacy.dp.delta))
    per_epoch = trained.history["retrieval"]["dp_epsilon"]
    assert len(per_epoch) == 2 and 0 < per_epoch[0] < per_epoch[1] == pytest.approx(report["epsilon"])
    assert trained.metrics["retrieval"]["model"]["recall@100"] > 0
