"""The DIN activation unit's variants (`ranking.attention_*`), on small random tensors and the tiny job's model."""

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
    with pytest.raises(ValueError, match="positions"):
        TargetAttention(positions=-1)


def test_positions_start_as_the_plain_unit_and_let_the_weight_follow_recency():
    """`ranking.attention_positions`: the MLP reads a learned embedding of each entry's place, so the same
    ad weighs differently at another place; untrained, the unit is still the mean pooling."""
    history, candidates, present = _inputs()
    unit = TargetAttention(units=(6,), positions=5, position_dim=3)
    summary, weights = unit(history, candidates, present)
    mask = present.numpy().astype(np.float32)
    np.testing.assert_array_equal(weights.numpy(), mask)
    np.testing.assert_allclose(summary.numpy(), (history.numpy() * mask[:, :, None]).sum(1)
                               / np.maximum(mask.sum(1), 1)[:, None], rtol=1e-6, atol=1e-6)
    assert unit.hidden[0].kernel.shape == (4 * 8 + 3, 6)
    _perturb(unit)
    same = tf.repeat(history[:1, :1], 5, axis=1)  # one ad at every place
    _, weights = unit(same, candidates[:1], tf.ones([1, 5], tf.bool))
    assert np.ptp(weights.numpy()[0]) > 1e-3  # its weight depends on where it is
    _, plain = TargetAttention(units=(6,))(same, candidates[:1], tf.ones([1, 5], tf.bool))
    assert np.ptp(plain.numpy()[0]) == 0.0  # without positions it cannot
    _, shorter = unit(history[:, :3], candidates, present[:, :3])  # a narrower history reads the first places
    assert shorter.shape == (3, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="wider than positions"):
        unit(tf.concat([history, history], 1), candidates, tf.concat([present, present], 1))
    again = TargetAttention.from_config(unit.get_config())
    assert again.positions == 5 and again.position_dim == 3


@pytest.mark.parametrize("mass", [True, False])
def test_attention_mass_is_the_mean_weight_of_each_history(trained_past, mass):
    """`ranking.attention_mass`: each history's parts end with the mean of the unit's weights over its known
    ads (0 for none), the one summary of how strongly the history speaks for the candidate that the
    cosine of the pooled vector normalises away; off, the parts are what they were."""
    from features.dataset import frame_to_tensors
    from trainer.builders import build_ranking
    from trainer.fit import build_model
    from trainer.inputs import ranking_dataset

    cfg = trained_past.config
    cfg = cfg.model_copy(update={"ranking": cfg.ranking.model_copy(update={"attention_mass": mass})})
    rows = trained_past.split.train.head(64)
    model = build_ranking(cfg, tf.distribute.get_strategy(), trained_past.schema, trained_past.vocabularies,
                          trained_past.catalog, trained_past.catalog_text_embeddings, rows)
    build_model(model, next(iter(ranking_dataset(rows, cfg, trained_past.schema))), tf.distribute.get_strategy())
    for unit in model.history_attention.values():
        _perturb(unit)
    features = frame_to_tensors(rows, model.feature_names, trained_past.schema)
    parts = model.input_parts(features)
    for name in model.histories:
        terms = model.history_terms(features[name], model.candidate_text(features), model.history_attention[name])
        mine = [p for g, p in parts if g == name]
        assert len(mine) == 3 + mass
        if mass:
            known = terms["known"].numpy()
            expected = (terms["weights"].numpy() * known).sum(1) / np.maximum(known.sum(1), 1)
            np.testing.assert_allclose(mine[-1].numpy()[:, 0], expected, rtol=1e-5, atol=1e-6)
            assert np.ptp(expected[known.sum(1) > 0]) > 1e-3  # it varies with the candidate and history
            assert (expected[known.sum(1) == 0] == 0).all()


def test_entry_features_move_the_weights():
    """Per-entry inputs (`ranking.attention_joint`'s click flag) reach the MLP: the same entries weigh
    differently with another flag, and an untrained unit ignores them (the mean pooling)."""
    history, candidates, present = _inputs()
    unit = TargetAttention(units=(6,))
    ones, zeros = tf.ones([3, 5, 1]), tf.zeros([3, 5, 1])
    np.testing.assert_array_equal(unit(history, candidates, present, entry_features=ones)[1].numpy(),
                                  present.numpy().astype(np.float32))
    assert unit.hidden[0].kernel.shape == (4 * 8 + 1, 6)
    _perturb(unit)
    clicked = unit(history, candidates, present, entry_features=ones)[1].numpy()
    skipped = unit(history, candidates, present, entry_features=zeros)[1].numpy()
    assert not np.allclose(clicked[0], skipped[0])
    np.testing.assert_array_equal(clicked[~present.numpy()], 0.0)


def test_joint_unit_weighs_both_histories_by_their_click(trained_past, tmp_path):
    """`ranking.attention_joint`: one unit (one set of weights, saved once) for the positives and the
    non-clicks; the same ads weigh differently as clicks and as non-clicks; a checkpoint restores it
    into a new model, and the exported graph scores the same through the TF1 loader."""
    from features.dataset import frame_to_tensors
    from features.history import HISTORY
    from features.user_stats import NEGATIVE_HISTORY
    from trainer.builders import build_ranking
    from trainer.fit import build_model
    from trainer.inputs import ranking_dataset

    cfg = trained_past.config
    cfg = cfg.model_copy(update={"ranking": cfg.ranking.model_copy(update={"attention_joint": True})})
    rows = trained_past.split.train.head(64)
    strategy = tf.distribute.get_strategy()
    model = build_ranking(cfg, strategy, trained_past.schema, trained_past.vocabularies, trained_past.catalog,
                          trained_past.catalog_text_embeddings, rows)
    build_model(model, next(iter(ranking_dataset(rows, cfg, trained_past.schema))), strategy)
    unit = model.history_attention[HISTORY]
    assert model.history_attention[NEGATIVE_HISTORY] is unit
    assert unit.hidden[0].kernel.shape[0] == 4 * 32 + 1  # projected keys and query, and the click flag
    assert len({id(v) for v in model.trainable_variables}) == len(model.trainable_variables)
    _perturb(unit)
    features = frame_to_tensors(rows, model.feature_names, trained_past.schema)
    text = model.candidate_text(features)
    as_clicks = model.history_terms(features[HISTORY], text, unit, clicked=True)["weights"].numpy()
    as_skips = model.history_terms(features[HISTORY], text, unit, clicked=False)["weights"].numpy()
    known = model.history_terms(features[HISTORY], text, unit)["known"].numpy() > 0
    assert known.any() and not np.allclose(as_clicks[known], as_skips[known])
    model.input_parts(features)  # both histories run through the one unit

    path = tf.train.Checkpoint(**model.checkpoint_parts()).write(str(tmp_path / "weights"))
    again = build_ranking(cfg, strategy, trained_past.schema, trained_past.vocabularies, trained_past.catalog,
                          trained_past.catalog_text_embeddings, rows)
    build_model(again, next(iter(ranking_dataset(rows, cfg, trained_past.schema))), strategy)
    tf.train.Checkpoint(**again.checkpoint_parts()).read(path).assert_existing_objects_matched()
    expected = model.serve_probabilities(features)["pctr"].numpy()
    np.testing.assert_allclose(again.serve_probabilities(features)["pctr"].numpy(), expected, rtol=1e-6)

    from tests.test_ranking_serving import TF1, _ranking_request
    from trainer.servables import RankingServable

    module = RankingServable(model, trained_past.schema, trained_past.text, explanations=False)
    tf.saved_model.save(module, str(tmp_path / "ranking"), signatures={"serving_default": module.serve})
    _, request = _ranking_request(trained_past, rows)
    served = TF1(tmp_path / "ranking").run(request)
    np.testing.assert_allclose(served["pctr"], expected, rtol=1e-4, atol=1e-6)
