"""The ranking graph as TF Serving runs it (TF1 loader, SignatureDef names) when the model reads the
user's past: cached ad text for known ads, the encoder only for unknown ones, and the history and
counters fed through the ranking and recommender signatures (the `trained_past` job: tests/conftest.py)."""

import json

import numpy as np
import tensorflow as tf

from features.history import HISTORY
from features.user_stats import NEGATIVE_HISTORY, USER_EVENTS, USER_STATS


class TF1:
    """A SavedModel loaded the way tensorflow_model_server loads it."""

    def __init__(self, path):
        import tensorflow_text  # noqa: F401  (the TF Text ops of the encoder path)

        self.session = tf.compat.v1.Session(graph=tf.Graph())
        meta = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], str(path))
        self.sig = meta.signature_def["serving_default"]

    def run(self, feats):
        return self.session.run({k: v.name for k, v in self.sig.outputs.items()},
                                {self.sig.inputs[k].name: v for k, v in feats.items()})


def _ranking_request(trained, rows):
    from trainer.serving_artifacts import as_numpy_features

    schema = trained.schema
    text = trained.catalog[[schema.ad_id, *schema.ad_text]]
    rows = rows.drop(columns=[c for c in schema.ad_text if c in rows]).merge(text, on=schema.ad_id, how="left")
    names = (*schema.query_features, *trained.ranking.user_inputs, *schema.ad_string_features, *schema.ad_text)
    return rows, as_numpy_features(rows, names, schema)


def test_known_ads_read_cached_text_and_unknown_ads_run_the_encoder(trained_past, tmp_path):
    from trainer.evaluate import predict_ranking
    from trainer.servables import RankingServable

    schema = trained_past.schema
    paths = {}
    for cache in (True, False):
        module = RankingServable(trained_past.ranking, schema, trained_past.text, cache_text=cache,
                                 explanations=False)  # the text paths only (tests/test_explanations.py)
        paths[cache] = tmp_path / f"ranking-{cache}"
        tf.saved_model.save(module, str(paths[cache]), signatures={"serving_default": module.serve})
    cached, encoding = TF1(paths[True]), TF1(paths[False])
    assert set(cached.sig.inputs) == set(encoding.sig.inputs) >= {HISTORY, NEGATIVE_HISTORY, *USER_STATS}

    rows, feats = _ranking_request(trained_past, trained_past.split.test.head(64))
    known = cached.run(feats)
    np.testing.assert_allclose(known["pctr"], encoding.run(feats)["pctr"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(known["pctr"], predict_ranking(trained_past.ranking, rows, schema)["pctr"],
                               rtol=1e-5, atol=1e-6)
    # A known ad's text comes from the table: the request's text is not read ...
    garbled = {**feats, "title": np.full_like(feats["title"], "zzz qqq")}
    np.testing.assert_allclose(cached.run(garbled)["pctr"], known["pctr"], rtol=1e-6, atol=1e-7)
    # ... while an unknown ad's text is encoded, in a batch mixed with known ads.
    mixed = {**garbled, "ad_id": feats["ad_id"].copy(), "title": feats["title"].copy()}
    mixed["ad_id"][::2] = "ad-not-in-the-catalog"
    out, reference = cached.run(mixed), encoding.run(mixed)
    np.testing.assert_allclose(out["pctr"], reference["pctr"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["pctr"][1::2], known["pctr"][1::2], rtol=1e-6, atol=1e-7)
    retitled = {**mixed, "title": np.full_like(mixed["title"], "zzz qqq")}
    assert not np.allclose(cached.run(retitled)["pctr"][::2], out["pctr"][::2], atol=1e-6)


def test_ranking_and_recommender_take_the_history_and_counters(trained_past, exported_past):
    from trainer.evaluate import predict_ranking
    from trainer.inputs import query_inputs
    from trainer.serving_artifacts import as_numpy_features

    schema = trained_past.schema
    meta = json.loads((exported_past.paths["ranking"] / "assets.extra" / "adrec.json").read_text())
    assert {HISTORY, NEGATIVE_HISTORY, *USER_STATS} <= set(meta["inputs"]) and meta["user_stats"]["recent_window"] == 10
    rows = trained_past.split.test.iloc[[0, 7, 19]].reset_index(drop=True)
    names = (*query_inputs(schema, trained_past.config.retrieval.history_length), NEGATIVE_HISTORY, *USER_STATS)
    feats = {**as_numpy_features(rows, names, schema),
             "excluded_ad_ids": np.full((len(rows), 1), "", dtype=object)}
    recommender = TF1(exported_past.paths["recommender"])
    assert set(recommender.sig.inputs) == set(feats)
    out = recommender.run(feats)
    for b in range(len(rows)):  # each returned ad's pCTR is the ranking model's, for this request's past
        ads = [a.decode() for a in out["ad_ids"][b]]
        candidates = trained_past.catalog.set_index(schema.ad_id).loc[ads].reset_index()
        for name in (*schema.query_features, HISTORY, NEGATIVE_HISTORY, *USER_STATS):
            candidates[name] = [rows.at[b, name]] * len(candidates)
        np.testing.assert_allclose(out["pctr"][b], predict_ranking(trained_past.ranking, candidates, schema)["pctr"],
                                   rtol=1e-4, atol=1e-6)
    veteran = {**feats, USER_EVENTS: feats[USER_EVENTS] + 500}  # the counters are read
    assert not np.allclose(recommender.run(veteran)["pctr"], out["pctr"], atol=1e-6)
    ranking = TF1(exported_past.paths["ranking"])
    ranked_rows, ranked = _ranking_request(trained_past, rows)
    np.testing.assert_allclose(ranking.run(ranked)["pctr"],
                               predict_ranking(trained_past.ranking, ranked_rows, schema)["pctr"], rtol=1e-5, atol=1e-6)


def test_target_attention_starts_as_the_mean_and_weighs_history_by_the_candidate(trained_past):
    from trainer.towers import TargetAttention

    rng = np.random.default_rng(0)
    history = tf.constant(rng.normal(size=(3, 5, 8)).astype(np.float32))
    present = tf.constant([[True] * 5, [True, True, False, False, False], [False] * 5])
    candidates = tf.constant(rng.normal(size=(3, 8)).astype(np.float32))
    unit = TargetAttention(units=4)
    summary, weights = unit(history, candidates, present)
    mask = present.numpy()[:, :, None].astype(np.float32)
    mean = (history.numpy() * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
    np.testing.assert_allclose(summary.numpy(), mean, rtol=1e-6, atol=1e-6)  # untrained: the mean pooling
    np.testing.assert_array_equal(weights.numpy(), present.numpy().astype(np.float32))
    unit.out.kernel.assign(rng.normal(size=unit.out.kernel.shape).astype(np.float32))
    _, one = unit(history, candidates, present)
    _, other = unit(history, -candidates, present)
    assert not np.allclose(one.numpy()[0], other.numpy()[0])  # another candidate, other weights
    np.testing.assert_array_equal(one.numpy()[~present.numpy()], 0.0)  # absent entries weigh nothing

    # The trained job's units moved away from the mean: the candidate changes what the history says.
    trained_units = trained_past.ranking.history_attention
    assert set(trained_units) == {HISTORY, NEGATIVE_HISTORY}
    assert all(np.abs(u.out.kernel.numpy()).max() > 0 for u in trained_units.values())
