"""Retrieval modelling: per-event histories without leakage, honest ranks and NDCG, the loss switches,
and the cold-start claim against the ID-only baseline on a small synthetic world."""

import time

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from features.history import HISTORY, add_history, history_matrix
from tests.conftest import tiny_config
from trainer.config import ConfigError, config_from_dict
from trainer.metrics import ndcg_at_k, popularity_ranks, ranks_of_targets, recall_at_k, retrieval_metrics


def _log(rows):
    return pd.DataFrame(rows, columns=["user_id", "ad_id", "timestamp", "click"])


def test_history_is_strictly_earlier_positives_of_the_same_user_most_recent_first():
    logs = _log([
        ("u1", "a1", 10, 1), ("u1", "a2", 20, 0), ("u2", "b1", 25, 1), ("u1", "a3", 30, 1),
        ("u1", "a4", 30, 1),  # same second as a3: neither is "before" the other
        ("u1", "a5", 40, 1), ("u1", "a6", 50, 1),
    ]).sample(frac=1.0, random_state=3)  # row order does not matter
    out = add_history(logs, 3).set_index("ad_id")[HISTORY]
    assert out["a1"] == ("", "", "")  # nothing before the first event
    assert out["a2"] == ("a1", "", "")
    assert out["b1"] == ("", "", "")  # another user's clicks never leak in
    assert out["a3"] == out["a4"] == ("a1", "", "")  # a negative (a2) is not history
    assert out["a5"] == ("a4", "a3", "a1") or out["a5"] == ("a3", "a4", "a1")
    assert out["a6"][0] == "a5" and len(out["a6"]) == 3  # capped at N, the oldest dropped
    assert list(add_history(logs, 3).index) == list(logs.index)  # row order kept


def test_history_of_held_out_rows_sees_earlier_held_out_events_only():
    from features.split import time_split

    rows = [("u1", f"a{t}", t, 1) for t in range(10)] + [("u2", f"b{t}", t, t % 2) for t in range(10)]
    logs = add_history(_log(rows), 4)
    split = time_split(logs, 0.3)
    for _, row in split.test.iterrows():
        same = logs[(logs.user_id == row.user_id) & (logs.click > 0)]
        allowed = set(same.loc[same.timestamp < row.timestamp, "ad_id"])
        later = set(same.loc[same.timestamp >= row.timestamp, "ad_id"])
        h = {a for a in row[HISTORY] if a}
        assert h <= allowed and not h & later
    last = split.test[split.test.user_id == "u1"].iloc[-1]
    assert last[HISTORY] == ("a8", "a7", "a6", "a5")  # includes held-out events before it
    matrix = history_matrix(split.test[HISTORY])
    assert matrix.shape == (len(split.test), 4) and matrix.dtype == object


def test_ties_are_pessimistic_even_a_few_ulps_apart():
    # Columns 1..4 share one embedding (e.g. cold ads in an OOV bucket); a matmul can leave them
    # ulps apart. The target must rank below all of them, whichever it is.
    base = np.float32(0.3)
    scores = np.array([[0.9, base, np.nextafter(base, 1), np.nextafter(base, 0), base, 0.1]], dtype=np.float32)
    for target in (1, 2, 3, 4):
        assert ranks_of_targets(scores, np.array([target]))[0] == 4
    assert ranks_of_targets(scores, np.array([0]))[0] == 0
    assert ranks_of_targets(scores, np.array([5]))[0] == 5
    assert ranks_of_targets(np.array([[np.nan, 1.0]]), np.array([0]))[0] == 1  # NaN ranks last
    # most-popular: never-clicked ads all score 0, so a cold target ranks last among them
    counts = np.array([5.0, 3.0, 0.0, 0.0, 0.0])
    assert list(popularity_ranks(counts, np.array([0, 2, 4]))) == [0, 4, 4]


def test_ndcg_and_recall_from_ranks():
    ranks = np.array([0, 1, 9, 10, 99, 100])
    assert recall_at_k(ranks, (10,)) == {"recall@10": 0.5}
    ndcg = ndcg_at_k(ranks, (10, 100))
    expected10 = (1 + 1 / np.log2(3) + 1 / np.log2(11)) / 6
    assert ndcg["ndcg@10"] == pytest.approx(expected10)
    assert ndcg["ndcg@100"] == pytest.approx(expected10 + (1 / np.log2(12) + 1 / np.log2(101)) / 6)
    assert set(retrieval_metrics(ranks, (10, 50))) == {"recall@10", "recall@50", "ndcg@10", "ndcg@50"}
    assert np.isnan(ndcg_at_k(np.array([], int), (10,))["ndcg@10"])


def test_retrieval_config_switches_and_ranges():
    cfg = config_from_dict({"retrieval": {"history_length": 0, "logq_correction": False,
                                          "remove_accidental_hits": False, "num_hard_negatives": 8}})
    assert cfg.retrieval.history_length == 0 and cfg.retrieval.num_hard_negatives == 8
    for key, value, message in (("history_length", -1, "an integer in"), ("user_id_dropout", 1.0, "a fraction"),
                                ("num_hard_negatives", -2, "an integer >= 0"),
                                ("eval_ks", [], "a non-empty list of integers >= 1")):
        with pytest.raises(ConfigError, match=f"retrieval.{key}: expected {message}"):
            config_from_dict({"retrieval": {key: value}})


def _small_model(tmp_path, **retrieval):
    from features import generate_world, time_split
    from features.vocab import build_vocabularies
    from trainer.builders import build_retrieval, build_text_assets
    from trainer.inputs import retrieval_dataset
    from trainer.prepare import join_ad_features, sampling_counts
    from trainer.text_encoder import encode_packed

    cfg = tiny_config(tmp_path, retrieval=retrieval)
    cfg.data.synthetic = type(cfg.data.synthetic)(n_users=100, n_advertisers=10, n_ads=60, n_impressions=3000)
    world = generate_world(cfg.data.synthetic)
    logs = add_history(world.logs, cfg.retrieval.history_length) if cfg.retrieval.history_length else world.logs
    split = time_split(logs, 0.2)
    train = join_ad_features(split.train, world.catalog, world.schema)
    text = build_text_assets(cfg, world.catalog, world.schema)
    cached = encode_packed(text.adapter, text.packed_catalog)
    model = build_retrieval(cfg, tf.distribute.get_strategy(), world.schema, build_vocabularies(split.train,
                            world.catalog), world.catalog, text, cached, sampling_counts(train, world.schema))
    return model, retrieval_dataset(train, cfg, world.schema)[0], train


def test_loss_switches_reach_the_tfrs_task(tmp_path):
    model, ds, train = _small_model(tmp_path, num_hard_negatives=4, history_length=5)
    assert model.task._remove_accidental_hits and model.task._num_hard_negatives == 4
    batch = next(iter(ds))
    assert batch[HISTORY].shape[1] == 5
    # logQ: each ad's share of the training positives
    positives = train[train.click > 0]
    top = positives.ad_id.value_counts()
    p = model.sampling_probability(tf.constant([top.index[0], "never-seen-ad"])).numpy()
    assert p[0] == pytest.approx(top.iloc[0] / len(positives), rel=1e-5) and 0 < p[1] <= p[0]
    history = model.fit(ds, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    plain, _, _ = _small_model(tmp_path / "plain", history_length=0, logq_correction=False,
                               remove_accidental_hits=False)
    assert plain.sampling_lookup is None and not plain.task._remove_accidental_hits
    assert plain.task._num_hard_negatives is None and plain.query_tower.history is None


def test_cold_start_ads_recall_3x_the_id_only_baseline(tmp_path):
    """Small synthetic world (tiny random BERT): the full model's Recall@100 on held-out clicks of
    ads launched after the training period is at least 3x the ID-only two-tower's, whose cold ads
    all share one OOV embedding and so rank behind every warm ad they tie or trail."""
    from features.synthetic import SyntheticConfig
    from trainer.job import run_training

    started = time.time()
    cfg = tiny_config(tmp_path, retrieval={"epochs": 4, "batch_size": 256, "baseline_epochs": 10},
                      ranking={"epochs": 1})
    cfg.data.synthetic = SyntheticConfig(n_users=500, n_advertisers=60, n_ads=600, n_impressions=30000)
    trained = run_training(cfg, progress=False)
    r = trained.metrics["retrieval"]
    model, baseline = r["model_cold"]["recall@100"], r["id_only_cold"]["recall@100"]
    print(f"cold-start ads ({r['cold_test_positives']} held-out clicks): Recall@100 model {model:.3f}, "
          f"ID-only {baseline:.3f}, most-popular {r['most_popular_cold']['recall@100']:.3f}; "
          f"all: model {r['model']['recall@100']:.3f}, ID-only {r['id_only']['recall@100']:.3f}; "
          f"{time.time() - started:.0f}s")
    assert r["cold_test_positives"] >= 50
    assert model >= 3 * baseline and model > 0.2
    assert r["model_cold"]["ndcg@100"] > r["id_only_cold"]["ndcg@100"]


def test_sequence_encoder_mean_and_newest_pool_adds_the_newest_entrys_state_and_zeros_for_no_history():
    from trainer.towers import SequenceEncoder

    tf.keras.utils.set_random_seed(0)
    encoder = SequenceEncoder(1, 2, 8, 4, pool="mean_and_newest")
    items = tf.constant(np.random.default_rng(0).normal(size=(3, 4, 5)), tf.float32)
    present = tf.constant([[True, True, False, False], [False] * 4, [True, True, False, False]])
    out = encoder(items, present).numpy()
    assert out.shape == (3, 16)
    np.testing.assert_array_equal(out[1], 0.0)  # an empty history gives zeros, mean and newest alike
    swapped = tf.concat([items[2:, 1::-1], items[2:, 2:]], axis=1)  # the same two entries, the other one newest
    again = encoder(swapped, present[2:]).numpy()
    assert not np.allclose(again[0, 8:], out[2, 8:])  # the newest entry's state follows the newest entry
    with pytest.raises(ValueError, match="pool"):
        SequenceEncoder(1, 2, 8, 4, pool="max")


def test_full_softmax_with_seen_negatives_leaves_ads_without_training_positives_out_of_the_training_loss(tmp_path):
    from features.dataset import frame_to_tensors
    from features.history import HISTORY
    from trainer.inputs import query_inputs
    from trainer.job import run_training

    cfg = tiny_config(tmp_path, retrieval={"epochs": 1, "loss": "full_softmax", "full_softmax_negatives": "seen",
                                           "exclude_history_from_loss": False},
                      evaluation={"baselines": ("most_popular",)})
    trained = run_training(cfg, progress=False, with_ranking=False)
    model, schema, catalog = trained.retrieval, trained.schema, trained.catalog
    positives = trained.split.train[trained.split.train[schema.click] > 0]
    seen = set(positives[schema.ad_id].astype(str))
    assert model.never_positive.numpy().tolist() == [a not in seen for a in catalog[schema.ad_id].astype(str)]
    assert not all(a in seen for a in catalog[schema.ad_id].astype(str))  # the world has ads never clicked

    batch = {k: tf.constant(v) for k, v in frame_to_tensors(
        positives.head(64), (*query_inputs(schema, cfg.retrieval.history_length), *schema.ad_string_features),
        schema).items()}
    queries = model.query_tower(batch, training=False)
    logits = (tf.matmul(queries, model.ad_embedding(model.catalog_features), transpose_b=True)
              / model.temperature).numpy()
    target = model.catalog_rows(batch[schema.ad_id]).numpy() - 1
    keep = ~model.never_positive.numpy()

    def cross_entropy(columns):
        z = np.where(columns[None, :], logits, -np.inf)
        top = z.max(1)
        return float(np.mean(np.log(np.exp(z - top[:, None]).sum(1)) + top - logits[np.arange(len(z)), target]))

    # The tiny config trains without dropout, so a training-mode pass differs only by the mask.
    assert float(model.compute_loss(batch, training=True)) == pytest.approx(cross_entropy(keep), rel=1e-4)
    every = np.ones_like(keep)
    assert float(model.compute_loss(batch, training=False)) == pytest.approx(cross_entropy(every), rel=1e-4)
    assert HISTORY in batch  # the query reads a history, as the quality configs' model does


def test_mask_history_sets_each_rows_history_ads_and_keeps_its_target():
    from trainer.retrieval import mask_history

    logits = tf.constant(np.arange(12, dtype=np.float32).reshape(2, 6))
    history = tf.constant([[4, 1, 4, -1], [2, -1, -1, -1]], tf.int64)  # a repeat, padding; row 1's target in it
    target = tf.constant([0, 2], tf.int64)
    out = mask_history(logits, history, target).numpy()
    expected = logits.numpy().copy()
    expected[0, [1, 4]] = -1e9  # row 1: its history 2 is its target, so nothing is masked
    np.testing.assert_array_equal(out, expected)
    with tf.GradientTape() as tape:  # masked entries pass no gradient, the others all of it
        tape.watch(logits)
        grad = tape.gradient(tf.reduce_sum(mask_history(logits, history, target)), logits).numpy()
    np.testing.assert_array_equal(grad, (expected > -1).astype(np.float32))
