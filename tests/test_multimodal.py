"""Creative vectors fused in both ad towers: the synthetic world's planted vector, the towers reading it,
and the exported graphs carrying the catalog's vectors (TF1 loader as TF Serving runs it, gRPC) with no
new input for callers."""

import numpy as np
import pytest
import tensorflow as tf

from features.synthetic import CREATIVE_COLUMN, SyntheticConfig, generate_world
from tests.conftest import tiny_config

WORLD = dict(n_users=150, n_advertisers=15, n_ads=80, n_impressions=3000)


@pytest.fixture(scope="module")
def exported_vectors(tmp_path_factory):
    from trainer.export import export_all
    from trainer.job import run_training

    cfg = tiny_config(tmp_path_factory.mktemp("multimodal"), retrieval={"epochs": 1},
                      ranking={"epochs": 1, "validation_fraction": 0.0}, evaluation={"baselines": ("most_popular",)})
    cfg.data.synthetic = SyntheticConfig(**WORLD, creative_dim=8, creative_weight=1.5)
    trained = run_training(cfg, progress=False)
    return trained, export_all(trained, cfg.export.export_dir)


def test_the_planted_vector_leaves_the_rest_of_the_world_unchanged():
    plain = generate_world(SyntheticConfig(**WORLD))
    silent = generate_world(SyntheticConfig(**WORLD, creative_dim=8))
    planted = generate_world(SyntheticConfig(**WORLD, creative_dim=8, creative_weight=1.5))
    assert CREATIVE_COLUMN not in plain.catalog and not plain.schema.ad_vector
    assert (silent.schema.ad_vector, silent.schema.ad_vector_dim) == (CREATIVE_COLUMN, 8)
    assert silent.schema.ad_vectors_of(silent.catalog).shape == (80, 8)
    assert plain.logs.equals(silent.logs) and plain.catalog.equals(silent.catalog.drop(columns=[CREATIVE_COLUMN]))
    assert not plain.logs["true_relevance"].equals(planted.logs["true_relevance"])
    with pytest.raises(ValueError, match="creative_weight"):
        SyntheticConfig(**WORLD, creative_weight=1.0)


def _with_vectors_scaled(layer, scale, fn):
    table = layer.table.numpy()
    layer.table.assign(table * scale)
    try:
        return fn()
    finally:
        layer.table.assign(table)


def test_both_ad_towers_read_the_vectors(exported_vectors):
    from trainer.evaluate import ad_embeddings, predict_ranking

    trained, _ = exported_vectors
    schema = trained.schema
    assert trained.retrieval.catalog_vectors is not None and trained.ranking.catalog_vectors is not None
    rows = trained.split.test.head(50)
    ads = ad_embeddings(trained.retrieval, trained.catalog, schema)
    pctr = predict_ranking(trained.ranking, rows, schema)["pctr"]
    # Another vector per ad (signs flipped: the towers L2-normalise it) -> other ad embeddings and scores.
    flipped = _with_vectors_scaled(trained.retrieval.catalog_vectors, -1.0,
                                   lambda: ad_embeddings(trained.retrieval, trained.catalog, schema))
    assert np.abs(flipped - ads).max() > 1e-3
    flipped = _with_vectors_scaled(trained.ranking.catalog_vectors, -1.0,
                                   lambda: predict_ranking(trained.ranking, rows, schema)["pctr"])
    assert np.abs(flipped - pctr).max() > 1e-4


def _tf1_run(path, feats):
    import tensorflow_text  # noqa: F401  (the TF Text ops of the ranking graph)

    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(path))
        sig = meta.signature_def["serving_default"]
        assert set(sig.inputs) == set(feats)  # callers send nothing new: the vectors are in the graph
        return sess.run({k: v.name for k, v in sig.outputs.items()}, {sig.inputs[k].name: v for k, v in feats.items()})


def _ranking_rows(trained, n):
    schema = trained.schema
    rows = trained.split.test.head(n).drop(columns=list(schema.ad_text), errors="ignore")
    rows = rows.merge(trained.catalog[[schema.ad_id, *schema.ad_text]], on=schema.ad_id, how="left")
    names = (*schema.query_features, *trained.ranking.user_inputs, *schema.ad_string_features, *schema.ad_text)
    return rows, names


def test_the_exported_graphs_carry_the_vectors_and_load_the_tf1_way(exported_vectors):
    from trainer.evaluate import ad_embeddings, predict_ranking, query_embeddings
    from trainer.inputs import query_inputs
    from trainer.serving_artifacts import as_numpy_features

    trained, result = exported_vectors
    schema = trained.schema
    rows, names = _ranking_rows(trained, 40)
    out = _tf1_run(result.paths["ranking"], as_numpy_features(rows, names, schema))
    np.testing.assert_allclose(out["pctr"], predict_ranking(trained.ranking, rows, schema)["pctr"],
                               rtol=1e-5, atol=1e-6)

    queries = trained.split.test.head(4).reset_index(drop=True)
    feats = as_numpy_features(queries, query_inputs(schema, trained.config.retrieval.history_length), schema)
    out = _tf1_run(result.paths["retrieval"], feats)
    expected = np.sort(query_embeddings(trained.retrieval, queries, schema)
                       @ ad_embeddings(trained.retrieval, trained.catalog, schema).T, axis=1)[:, ::-1]
    np.testing.assert_allclose(out["scores"], expected[:, :out["scores"].shape[1]], rtol=1e-4, atol=1e-5)

    feats["excluded_ad_ids"] = np.full((len(queries), 1), "", dtype=object)
    out = _tf1_run(result.paths["recommender"], feats)
    for b in range(len(queries)):  # each returned ad's pCTR is the ranking model's, vector included
        ads = [a.decode() for a in out["ad_ids"][b]]
        candidates = trained.catalog.set_index(schema.ad_id).loc[ads].reset_index()
        for name in schema.query_features:
            candidates[name] = queries.at[b, name]
        np.testing.assert_allclose(out["pctr"][b], predict_ranking(trained.ranking, candidates, schema)["pctr"],
                                   rtol=1e-4, atol=1e-6)


def test_a_grpc_round_trip(exported_vectors):
    from serving.client import RecommendationClient
    from serving.server import EmbeddedModelServer, discover_models
    from trainer.evaluate import predict_ranking
    from trainer.serving_artifacts import as_numpy_features

    trained, result = exported_vectors
    schema = trained.schema
    rows, names = _ranking_rows(trained, 8)
    user = {n: rows.at[0, n] for n in schema.query_string_features}
    context = {n: int(rows.at[0, n]) for n in schema.query_int_features}
    with EmbeddedModelServer(discover_models(result.paths["ranking"].parent.parent), host="127.0.0.1", port=0,
                             warmup=False) as server, RecommendationClient(server.address, timeout=20) as client:
        ads = client.recommend(user, context, k=5)
        assert len(ads) == 5 and {a.ad_id for a in ads} <= set(trained.catalog[schema.ad_id])
        feats = {k: v.tolist() if v.ndim == 1 else v for k, v in as_numpy_features(rows, names, schema).items()}
        out = client.predict(feats, model_name="ranking")
    np.testing.assert_allclose(out["pctr"], predict_ranking(trained.ranking, rows, schema)["pctr"],
                               rtol=1e-5, atol=1e-6)
