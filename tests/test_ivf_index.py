"""The IVF index (trainer/ivf_index.py): recall against brute force, the widened probe, int8 and
bfloat16 storage, an export that stock TF Serving loads (op check, TF1 loader) and serves over gRPC,
and the settings refused."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from serving.client import RecommendationClient
from serving.server import EmbeddedModelServer, discover_models
from trainer.config import ConfigError, apply_overrides, load_config
from trainer.evaluate import ad_embeddings, query_embeddings
from trainer.export import check_servable_ops, export_all, graph_ops
from trainer.inputs import query_inputs
from trainer.ivf_index import IvfIndex, auto_partitions, build_layout
from trainer.servables import ExportError, RetrievalServable
from trainer.serving_artifacts import as_numpy_features

from .conftest import ROOT


def _with_export(trained, **export):
    """The trained models under a config whose export section has these overrides."""
    cfg = trained.config.model_copy(deep=True)
    cfg.export = type(cfg.export).model_validate({**cfg.export.__dict__, **export})
    return dataclasses.replace(trained, config=cfg)


def _embeddings(trained, n_queries=40):
    schema = trained.schema
    rows = trained.split.test.iloc[:n_queries].reset_index(drop=True)
    return (rows, query_embeddings(trained.retrieval, rows, schema),
            ad_embeddings(trained.retrieval, trained.catalog, schema))


def _recall(found, exact):
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def _search(ads, queries, layout, nprobe, k, storage="float32"):
    index = IvfIndex(None, ads, tf.range(len(ads)), layout, nprobe, storage)
    scores, ids = index(tf.constant(queries), k)
    return scores.numpy(), ids.numpy()


def test_layout_partitions_every_ad_once_and_is_seeded():
    rng = np.random.default_rng(0)
    ads = rng.standard_normal((500, 16)).astype(np.float32)
    layout = build_layout(ads, 0, seed=3)
    assert layout.n_partitions <= auto_partitions(500) == 89
    assert sorted(layout.order) == list(range(500)) and layout.sizes.sum() == 500 and (layout.sizes > 0).all()
    np.testing.assert_array_equal(layout.starts, np.concatenate([[0], np.cumsum(layout.sizes)[:-1]]))
    again = build_layout(ads, 0, seed=3)
    np.testing.assert_array_equal(again.order, layout.order)
    assert not np.array_equal(build_layout(ads, 0, seed=4).order, layout.order)
    with pytest.raises(ValueError, match="more than the catalog's 500 ads"):
        build_layout(ads, 501)


def test_recall_against_brute_force_on_the_tiny_catalog(trained_tiny):
    _, queries, ads = _embeddings(trained_tiny)
    k = 10
    exact_scores = np.sort(queries @ ads.T, axis=1)[:, ::-1][:, :k]
    exact = np.argsort(-(queries @ ads.T), axis=1)[:, :k]
    layout = build_layout(ads, 0, seed=1)
    scores, ids = _search(ads, queries, layout, layout.n_partitions, k)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)  # every partition probed: exact
    assert _recall(ids, exact) == 1.0
    recalls = [_recall(_search(ads, queries, layout, nprobe, k)[1], exact) for nprobe in (2, 8, 16)]
    assert recalls == sorted(recalls) and recalls[-1] >= 0.8, recalls  # more probes, more recall
    assert recalls[0] < 1.0, "two probes of the tiny catalog's partitions should miss some ads"


def test_a_request_for_more_ads_than_the_probes_hold_widens_the_probe(trained_tiny):
    _, queries, ads = _embeddings(trained_tiny, 8)
    layout = build_layout(ads, 20, seed=1)
    assert layout.sizes.max() < 60  # one probe holds fewer than the 60 asked for
    scores, ids = _search(ads, queries, layout, 1, 60)
    assert scores.shape == (8, 60) and np.isfinite(scores).all()
    assert all(len(set(row)) == 60 for row in ids) and (np.diff(scores, axis=1) <= 1e-6).all()
    scores, ids = _search(ads, queries, layout, 1, len(ads) + 5)  # more than the catalog: all of it
    assert ids.shape == (8, len(ads)) and all(sorted(row) == list(range(len(ads))) for row in ids)
    np.testing.assert_allclose(scores, np.sort(queries @ ads.T, axis=1)[:, ::-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_blocks_pad_partitions_and_one_query_matches_the_batch(block):
    """Partitions padded to whole blocks (7: most end in a part-filled block; 64: larger than most
    partitions): padding never comes back, and a query alone (its matrix-vector path) finds what it
    finds within a batch."""
    rng = np.random.default_rng(5)
    ads, queries = rng.standard_normal((300, 8)).astype(np.float32), rng.standard_normal((6, 8)).astype(np.float32)
    layout = build_layout(ads, 20, seed=2)
    index = IvfIndex(None, ads, tf.range(len(ads)), layout, 3, block=block)
    assert index.vectors.shape[1] == block and index.vectors.shape[0] * block >= len(ads)
    scores, ids = (t.numpy() for t in index(tf.constant(queries), 40))
    assert np.isfinite(scores).all() and all(len(set(row)) == 40 for row in ids)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ ads.T, ids, axis=1), rtol=1e-5, atol=1e-6)
    for b in range(len(queries)):
        alone_scores, alone_ids = (t.numpy()[0] for t in index(tf.constant(queries[b:b + 1]), 40))
        np.testing.assert_array_equal(alone_ids, ids[b])
        np.testing.assert_allclose(alone_scores, scores[b], rtol=1e-5, atol=1e-6)
    every = IvfIndex(None, ads, tf.range(len(ads)), layout, layout.n_partitions, block=block)
    exact = np.argsort(-(queries @ ads.T), axis=1)[:, :40]
    np.testing.assert_array_equal(every(tf.constant(queries), 40)[1].numpy(), exact)
    with pytest.raises(ValueError, match="ivf block 0"):
        IvfIndex(None, ads, tf.range(len(ads)), layout, 3, block=0)


@pytest.mark.parametrize("storage, atol, min_recall", [("bfloat16", 2e-2, 0.8), ("int8", 2e-2, 0.8)])
def test_quantised_storage_scores_close_to_exact(trained_tiny, storage, atol, min_recall):
    _, queries, ads = _embeddings(trained_tiny)
    layout = build_layout(ads, 0, seed=1)
    k = 10
    exact = np.argsort(-(queries @ ads.T), axis=1)[:, :k]
    scores, ids = _search(ads, queries, layout, layout.n_partitions, k, storage)
    for b in range(len(queries)):  # each returned score is the ad's exact score, up to the storage's rounding
        np.testing.assert_allclose(scores[b], queries[b] @ ads[ids[b]].T, atol=atol)
    assert _recall(ids, exact) >= min_recall
    index = IvfIndex(None, ads, tf.range(len(ads)), layout, 4, storage)
    assert index.vectors.dtype == {"bfloat16": tf.bfloat16, "int8": tf.int8}[storage]
    saved = IvfIndex(None, ads, tf.range(len(ads)), layout, 4, "float32").nbytes() - index.nbytes()
    assert saved >= ads.size * (2 if storage == "bfloat16" else 3) - (4 * len(ads) if storage == "int8" else 0)


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_quantised_retrieval_servable_passes_the_op_check_and_loads_the_tf1_way(trained_tiny, storage, tmp_path):
    trained = _with_export(trained_tiny, index="ivf", ivf_storage=storage, ivf_partitions=12, nprobe=12)
    module = RetrievalServable(trained, 5)
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.serve})
    check_servable_ops(tmp_path)
    rows, queries, ads = _embeddings(trained, 4)
    feats = as_numpy_features(rows, query_inputs(trained.schema, trained.config.retrieval.history_length),
                              trained.schema)
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(tmp_path))
        sig = meta.signature_def["serving_default"]
        scores = sess.run(sig.outputs["scores"].name, {sig.inputs[k].name: v for k, v in feats.items()})
    np.testing.assert_allclose(scores, np.sort(queries @ ads.T, axis=1)[:, ::-1][:, :5], atol=2e-2)


@pytest.fixture(scope="module")
def exported_ivf(trained_tiny, tmp_path_factory):
    """All three servables with an IVF index of 16 partitions probing 2 (~25 of the 200 ads): the
    retrieval's top 50 and the recommender's over-fetch both need the widened probe."""
    trained = _with_export(trained_tiny, index="ivf", ivf_partitions=16, nprobe=2)
    return trained, export_all(trained, tmp_path_factory.mktemp("ivf") / "models")


def test_ivf_export_uses_only_stock_ops_and_names_its_index(exported_ivf):
    import json

    _, result = exported_ivf
    ops = graph_ops(result.paths["retrieval"])  # export_all ran check_servable_ops on every graph
    assert {"TopKV2", "RaggedRange"} <= ops and all(hasattr(tf.raw_ops, op) for op in ops)
    meta = json.loads((result.paths["retrieval"] / "assets.extra" / "adrec.json").read_text())
    assert meta["index"]["kind"] == "ivf" and meta["index"]["nprobe"] == 2
    assert meta["index"]["partitions"] <= 16


def test_ivf_retrieval_loads_the_tf1_way_and_matches_the_in_process_index(exported_ivf):
    trained, result = exported_ivf
    rows, queries, ads = _embeddings(trained, 6)
    feats = as_numpy_features(rows, query_inputs(trained.schema, trained.config.retrieval.history_length),
                              trained.schema)
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(result.paths["retrieval"]))
        sig = meta.signature_def["serving_default"]
        ids, scores = sess.run([sig.outputs["ad_ids"].name, sig.outputs["scores"].name],
                               {sig.inputs[k].name: v for k, v in feats.items()})
    top_k = trained.config.export.top_k
    assert ids.shape == (6, top_k) and np.isfinite(scores).all()
    layout = build_layout(ads, 16, seed=trained.config.training.seed)
    expected_scores, expected = _search(ads, queries, layout, 2, top_k)
    catalog_ids = trained.catalog[trained.schema.ad_id].astype(str).to_numpy()
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-5)
    assert [[i.decode() for i in row] for row in ids[:, :5]] == catalog_ids[expected[:, :5]].tolist()
    assert _recall(expected, np.argsort(-(queries @ ads.T), axis=1)[:, :top_k]) >= 0.5


def test_ivf_recommender_serves_over_grpc_with_exclusions(exported_ivf):
    trained, result = exported_ivf
    user = {"user_id": "u00001", "age_bucket": "25-34", "gender": "f", "region": "r1"}
    context = {"device": "mobile", "placement": "feed", "hour": 20, "weekday": 4}
    catalog = set(trained.catalog[trained.schema.ad_id])
    with EmbeddedModelServer(discover_models(result.paths["recommender"].parent.parent), host="127.0.0.1",
                             port=0, warmup=False) as server, \
            RecommendationClient(server.address, timeout=20) as client:
        first = [a.ad_id for a in client.recommend(user, context, k=8)]
        assert len(first) == 8 and set(first) <= catalog
        shown = first[:3]
        again = [a.ad_id for a in client.recommend(user, context, k=8, exclude=shown)]
        assert len(again) == 8 and not set(again) & set(shown)
        assert [a for a in again if a in first] == first[3:]  # the rest move up, in order
        # Excluding 150 of the 200 ads over-fetches 40 + 150 candidates, far more than two probes hold.
        many = sorted(catalog - set(first))[:150]
        rest = [a.ad_id for a in client.recommend(user, context, k=10, exclude=many)]
        assert len(rest) == 10 and not set(rest) & set(many)
        out = client.predict({**{k: [v] for k, v in {**user, **context}.items()},
                              "history": np.full((1, trained.config.retrieval.history_length), b"", dtype=object)},
                             model_name="retrieval")
        assert out["ad_ids"].shape == (1, trained.config.export.top_k)
        assert len(set(out["ad_ids"][0])) == trained.config.export.top_k


@pytest.mark.parametrize("item, message", [
    ("export.index=scann", "--set export.index: expected one of ['brute_force', 'ivf']"),
    ("export.nprobe=0", "--set export.nprobe: expected an integer in [1, 1000000], got 0"),
    ("export.ivf_partitions=-1", "--set export.ivf_partitions: expected an integer in [0, 1000000], got -1"),
    ("export.ivf_storage=float16", "--set export.ivf_storage: expected one of ['float32', 'bfloat16', 'int8']"),
    ("export.ivf_iterations=0", "--set export.ivf_iterations: expected an integer in [1, 100], got 0"),
])
def test_bad_ivf_settings_are_refused(item, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(load_config(ROOT / "configs" / "tiny.yaml"), [item])
    assert str(err.value).startswith(message), str(err.value)


def test_more_probes_than_partitions_and_more_partitions_than_ads_are_refused(trained_tiny):
    with pytest.raises(ConfigError, match="export.nprobe: 9 is more than export.ivf_partitions 8"):
        apply_overrides(load_config(ROOT / "configs" / "tiny.yaml"),
                        ["export.ivf_partitions=8", "export.nprobe=9"])
    trained = _with_export(trained_tiny, index="ivf", ivf_partitions=500, nprobe=4)
    with pytest.raises(ExportError, match="export.ivf_partitions 500 is more than the catalog's 200 ads"):
        RetrievalServable(trained, 10)
