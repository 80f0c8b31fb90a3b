"""Each SavedModel is loaded the way TF Serving loads it (TF1 graph mode, SignatureDef names)
and must give the outputs the trained models give in-process."""

import shutil

import numpy as np
import pytest
import tensorflow as tf

from serving.servable import Servable
from trainer.evaluate import ad_embeddings, predict_ctr, predict_ranking, query_embeddings
from trainer.export import (
    TF_TEXT_OPS,
    ExportError,
    export_all,
    graph_ops,
    next_version,
)
from trainer.inputs import query_inputs
from trainer.serving_artifacts import as_numpy_features


def _requests(trained, n=12):
    rows = trained.split.test.iloc[:: max(1, len(trained.split.test) // n)].head(n).reset_index(drop=True)
    names = query_inputs(trained.schema, trained.config.retrieval.history_length)
    return rows, as_numpy_features(rows, names, trained.schema)


def _recommender_request(trained, n):
    rows, feats = _requests(trained, n)
    return rows, {**feats, "excluded_ad_ids": np.full((len(rows), 1), "", dtype=object)}


def test_layout_versions_and_metadata(exported_tiny):
    assert exported_tiny.version == 1
    for name, path in exported_tiny.paths.items():
        assert path.name == "1" and path.parent.name == name
        assert (path / "saved_model.pb").exists() and (path / "variables").is_dir()
        assert (path / "assets.extra" / "adrec.json").exists()
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]


def test_ranking_graph_uses_only_servable_ops(exported_tiny):
    ops = graph_ops(exported_tiny.paths["ranking"])
    assert {"FastWordpieceTokenizeWithOffsets", "CaseFoldUTF8"} <= ops
    assert all(hasattr(tf.raw_ops, op) or op in TF_TEXT_OPS for op in ops)


def test_tf1_loader_with_raw_signature_tensor_names(exported_tiny, trained_tiny):
    """Exactly what tensorflow_model_server does: loader.load + session.run by tensor name."""
    import tensorflow_text  # noqa: F401

    rows, feats = _requests(trained_tiny, 4)
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(exported_tiny.paths["retrieval"]))
        sig = meta.signature_def["serving_default"]
        feed = {sig.inputs[k].name: v for k, v in feats.items()}
        ids, scores = sess.run([sig.outputs["ad_ids"].name, sig.outputs["scores"].name], feed)
    assert ids.shape == (4, trained_tiny.config.export.top_k)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


@pytest.mark.parametrize("name", ["ranking", "recommender"])
def test_ranking_and_recommender_load_the_tf1_way(exported_tiny, trained_tiny, name):
    import tensorflow_text  # noqa: F401

    schema = trained_tiny.schema
    rows, feats = _recommender_request(trained_tiny, 4)
    if name == "ranking":
        rows = rows.merge(trained_tiny.catalog[[schema.ad_id, *schema.ad_text]], on=schema.ad_id)
        feats = as_numpy_features(rows, (*schema.query_features, *schema.ad_string_features, *schema.ad_text),
                                  schema)
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(exported_tiny.paths[name]))
        sig = meta.signature_def["serving_default"]
        assert set(sig.inputs) == set(feats) and "position" not in sig.inputs
        out = sess.run({k: v.name for k, v in sig.outputs.items()}, {sig.inputs[k].name: v for k, v in feats.items()})
    explained = {"because_ad_ids", "because_weights", "group_contributions"}  # tests/test_explanations.py
    if name == "ranking":
        assert set(out) == {"pctr", "pcvr", *explained}
        np.testing.assert_allclose(out["pctr"], predict_ctr(trained_tiny.ranking, rows, schema), rtol=1e-3, atol=1e-4)
    else:
        assert set(out) == {"ad_ids", "pctr", "pcvr", "score", "retrieval_scores", *explained}
        assert out["ad_ids"].shape == (4, trained_tiny.config.export.recommend_k)
    # this ranking model reads no history: no ad to name, and the history groups move nothing
    assert (out["because_ad_ids"] == b"").all() and (out["because_weights"] == 0).all()
    assert (out["group_contributions"][..., 4:] == 0).all() and (out["group_contributions"][..., :4] != 0).any()
    assert ((out["pcvr"] > 0) & (out["pcvr"] < 1)).all()


def test_tf1_loader_feeds_the_history_input(exported_tiny, trained_tiny):
    """The retrieval signature takes `history` [batch, N] (padded with ""); the TF1 session reads it:
    the same user and context with and without a history get different top ads."""
    import tensorflow_text  # noqa: F401

    n = trained_tiny.config.retrieval.history_length
    rows, feats = _requests(trained_tiny, 6)
    with_history = [i for i, h in enumerate(feats["history"]) if h[0] != ""]
    assert n > 0 and with_history, "the test rows should carry histories"
    empty = {**feats, "history": np.full_like(feats["history"], "")}
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(exported_tiny.paths["retrieval"]))
        sig = meta.signature_def["serving_default"]
        assert [d.size for d in sig.inputs["history"].tensor_shape.dim] == [-1, n]
        assert sig.inputs["history"].dtype == tf.string.as_datatype_enum
        fetch = [sig.outputs["ad_ids"].name, sig.outputs["scores"].name]
        ids, scores = sess.run(fetch, {sig.inputs[k].name: v for k, v in feats.items()})
        ids0, scores0 = sess.run(fetch, {sig.inputs[k].name: v for k, v in empty.items()})
    assert not np.allclose(scores[with_history], scores0[with_history])
    # in-process query tower on the same history gives the same best score
    schema = trained_tiny.schema
    expected = (query_embeddings(trained_tiny.retrieval, rows, schema) @ ad_embeddings(
        trained_tiny.retrieval, trained_tiny.catalog, schema).T).max(axis=1)
    np.testing.assert_allclose(scores[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_retrieval_matches_in_process_model(exported_tiny, trained_tiny):
    rows, feats = _requests(trained_tiny)
    out = Servable("retrieval", 1, exported_tiny.paths["retrieval"]).run(feats)
    schema = trained_tiny.schema
    scores = query_embeddings(trained_tiny.retrieval, rows, schema) @ ad_embeddings(
        trained_tiny.retrieval, trained_tiny.catalog, schema).T
    k = out["scores"].shape[1]
    expected = np.sort(scores, axis=1)[:, ::-1][:, :k]
    np.testing.assert_allclose(out["scores"], expected, rtol=1e-4, atol=1e-5)
    ids = trained_tiny.catalog[schema.ad_id].to_numpy()
    for b in range(len(rows)):
        served = [i.decode() for i in out["ad_ids"][b]]
        np.testing.assert_allclose(scores[b, [np.flatnonzero(ids == s)[0] for s in served]],
                                   out["scores"][b], rtol=1e-4, atol=1e-5)


def test_ranking_tokenizes_in_graph_like_the_training_cache(exported_tiny, trained_tiny):
    schema = trained_tiny.schema
    rows, _ = _requests(trained_tiny)
    rows = rows.merge(trained_tiny.catalog[[schema.ad_id, *schema.ad_text]], on=schema.ad_id)
    names = (*schema.query_features, *schema.ad_string_features, *schema.ad_text)
    servable = Servable("ranking", 1, exported_tiny.paths["ranking"])
    assert schema.position not in servable.signature()[0]  # served without a position
    out = servable.run(as_numpy_features(rows, names, schema))
    # In-process: the cached text embeddings of catalog ads (computed once at training time);
    # calibrated, position tower dropped.
    expected = predict_ranking(trained_tiny.ranking, rows, schema)
    np.testing.assert_allclose(out["pctr"], expected["pctr"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(out["pcvr"], expected["pcvr"], rtol=1e-3, atol=1e-4)
    assert not np.allclose(out["pctr"], expected["pctr_with_position"], atol=1e-3)  # the tower is dropped


def test_recommender_chains_retrieval_and_ranking(exported_tiny, trained_tiny):
    schema = trained_tiny.schema
    cfg = trained_tiny.config.export
    rows, feats = _recommender_request(trained_tiny, 3)
    out = Servable("recommender", 1, exported_tiny.paths["recommender"]).run(feats)
    assert out["ad_ids"].shape == (3, cfg.recommend_k)
    scores = query_embeddings(trained_tiny.retrieval, rows, schema) @ ad_embeddings(
        trained_tiny.retrieval, trained_tiny.catalog, schema).T
    for b in range(len(rows)):
        candidates = trained_tiny.catalog.iloc[np.argsort(-scores[b])[: cfg.retrieve_n]].copy()
        for name in schema.query_features:
            candidates[name] = rows.at[b, name]
        pctr = predict_ctr(trained_tiny.ranking, candidates, schema)
        order = np.argsort(-pctr)[: cfg.recommend_k]
        np.testing.assert_allclose(out["pctr"][b], pctr[order], rtol=1e-3, atol=1e-5)
        assert [i.decode() for i in out["ad_ids"][b][:3]] == candidates[schema.ad_id].to_numpy()[order][:3].tolist()
        assert (np.diff(out["pctr"][b]) <= 1e-7).all()
        np.testing.assert_allclose(out["score"][b], out["pctr"][b])  # the tiny job's objective: pctr


def test_next_export_is_a_new_version_and_failures_publish_nothing(trained_tiny, exported_tiny,
                                                                   monkeypatch, tmp_path):
    # Version 1 is the session's export (a fresh directory's first version), copied so that the
    # shared one stays as other tests expect it.
    base = shutil.copytree(exported_tiny.paths["recommender"].parent.parent, tmp_path / "models")
    second = export_all(trained_tiny, base)
    assert (exported_tiny.version, second.version) == (1, 2)
    monkeypatch.setattr("trainer.export.TF_TEXT_OPS", frozenset())
    with pytest.raises(ExportError, match="FastWordpieceTokenizeWithOffsets"):
        export_all(trained_tiny, base)
    for name in ("retrieval", "ranking", "recommender"):  # all or nothing: no v3, no temp dir left
        assert sorted(p.name for p in (base / name).iterdir()) == ["1", "2"], name


def test_next_version_counts_only_int64_version_names(tmp_path):
    """`007` and numbers above int64 are no versions to the server, so none to export either."""
    for model, name in [("retrieval", "3"), ("ranking", "007"), ("recommender", "9223372036854775808"),
                        ("ranking", ".tmp-9")]:
        (tmp_path / model / name).mkdir(parents=True)
    assert next_version(tmp_path) == 4
    (tmp_path / "retrieval" / str(2**63 - 1)).mkdir()
    with pytest.raises(ExportError, match="no int64 version number is left"):
        next_version(tmp_path)
