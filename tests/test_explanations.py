"""Explanations in the served graphs (trainer/explain.py): which history ads drove each ad's score and
which feature groups moved it; faithful on a world where an earlier click causes the current one, the
same through the TF1 loader and over gRPC, and rendered by the client and `adrec recommend`."""

import json

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from serving.contract import EXPLAINED_HISTORY, EXPLANATION_GROUPS, EXPLANATIONS, HISTORY, USER_STATS
from tests.test_ranking_serving import TF1, _ranking_request

CAUSES = 0.7  # P(click) when the user clicked this very ad before: the planted cause
OTHERWISE = 0.03


def _planted(trained, n_rows: int, seed: int, cause_share: float) -> pd.DataFrame:
    """Training rows with new histories of five ads and new clicks: with probability `cause_share` one of
    the five is the candidate ad itself (an earlier click on it, at a random place), the others are
    other catalog ads; the click follows that planted cause alone."""
    rng = np.random.default_rng(seed)
    schema = trained.schema
    width = trained.ranking.history_length
    rows = trained.split.train.sample(n_rows, replace=True, random_state=seed).reset_index(drop=True)
    ads = trained.catalog[schema.ad_id].astype(str).to_numpy()
    histories, causes, clicks = [], [], []
    for ad in rows[schema.ad_id]:
        cause = str(ad) if rng.random() < cause_share else ""
        entries = list(rng.choice(ads[ads != ad], size=5 - bool(cause), replace=False))
        if cause:  # five entries either way: the history's length says nothing
            entries.insert(int(rng.integers(0, 5)), cause)
        histories.append(np.array(entries + [""] * (width - len(entries)), dtype=object))
        causes.append(cause)
        clicks.append(float(rng.random() < (CAUSES if cause else OTHERWISE)))
    rows[HISTORY] = histories
    rows["cause"] = causes
    rows[schema.click] = np.asarray(clicks, np.float32)
    rows[schema.conversion] = np.float32(0.0)
    return rows


@pytest.fixture(scope="module")
def planted(trained_past):
    """A ranking model that reads the history by target attention, trained on the planted world. The
    world's ads have distinct text vectors (random ones): the tiny random BERT's are nearly parallel
    (cosine ~0.96), which would hide which ad a history holds from a model that reads history ads by
    their text."""
    return _planted_model(trained_past)


@pytest.fixture(scope="module")
def planted_din(trained_past):
    """`planted` with the other activation unit settings: DIN's unscaled sum, weights from the projected
    text and each entry's position, two hidden layers with dropout, the mean weight as a feature."""
    return _planted_model(trained_past, attention_keys="projected", attention_scale="sum", attention_units=(16, 8),
                          attention_dropout=0.1, attention_positions=True, attention_mass=True)


def _planted_model(trained_past, **attention):
    from trainer.builders import build_ranking
    from trainer.fit import build_model
    from trainer.inputs import ranking_dataset

    cfg = trained_past.config
    cfg = cfg.model_copy(update={"ranking": cfg.ranking.model_copy(update={
        "history": True, "negative_history": False, "user_stats": False, "history_pool": "target_attention",
        "user_id_dropout": 0.0, **attention})})
    rows = _planted(trained_past, 3000, seed=1, cause_share=0.5)
    strategy = tf.distribute.get_strategy()
    tf.keras.utils.set_random_seed(3)
    text = np.random.default_rng(4).normal(size=trained_past.catalog_text_embeddings.shape).astype(np.float32)
    model = build_ranking(cfg, strategy, trained_past.schema, trained_past.vocabularies, trained_past.catalog, text,
                          rows)
    data = ranking_dataset(rows, cfg, trained_past.schema)
    build_model(model, next(iter(data)), strategy)
    model.fit(data, epochs=3, verbose=0)
    return model


def _logits(model, rows, schema) -> np.ndarray:
    from features.dataset import frame_to_tensors

    return model.logits(frame_to_tensors(rows, model.feature_names, schema))["ctr"].numpy()


def _without(rows: pd.DataFrame, ads) -> pd.DataFrame:
    """`rows` with each row's given history ad taken out (pooling does not read the order)."""
    out = rows.copy()
    out[HISTORY] = [np.array([a if a != gone else "" for a in h], dtype=object) for h, gone in
                    zip(rows[HISTORY], ads, strict=True)]
    return out


@pytest.mark.parametrize("pool", ["mean", "target_attention"])
def test_removing_the_top_explained_ad_lowers_the_score_more_than_a_random_one(trained_past, planted, pool):
    """With `pool` mean, the planted model's trained weights pool its history by the mean (its attention
    unit left out): one training serves both poolings, each explained by its own forward pass."""
    units = planted.history_attention
    planted.history_attention = units if pool == "target_attention" else {}
    try:
        _check_faithful(trained_past, planted, pool)
    finally:
        planted.history_attention = units


def test_the_din_unit_settings_explain_exactly_and_serve_the_same_the_tf1_way(trained_past, planted_din, tmp_path):
    """Leave-one-out drops stay exact when the pool is an unscaled sum, and the exported graph (weights
    computed from the projected text) gives the in-process scores and explanations through the TF1 loader."""
    from features.dataset import frame_to_tensors
    from trainer.explain import explain
    from trainer.servables import RankingServable

    _check_faithful(trained_past, planted_din, "target_attention, sum of projected-key weights")
    schema = trained_past.schema
    module = RankingServable(planted_din, schema, trained_past.text)
    tf.saved_model.save(module, str(tmp_path / "ranking"), signatures={"serving_default": module.serve})
    rows, feats = _ranking_request(trained_past, _planted(trained_past, 16, seed=3, cause_share=0.5))
    server = TF1(tmp_path / "ranking")
    served = server.run({k: v for k, v in feats.items() if k in server.sig.inputs})  # it reads no counters
    inputs = frame_to_tensors(rows, planted_din.feature_names, schema)
    expected = {**{k: v.numpy() for k, v in planted_din.serve_probabilities(inputs).items()},
                **{k: v.numpy() for k, v in explain(planted_din, inputs, None).items()}}
    np.testing.assert_array_equal(served["because_ad_ids"], expected["because_ad_ids"])
    for name in ("pctr", "because_weights", "group_contributions"):
        np.testing.assert_allclose(served[name], expected[name], rtol=1e-4, atol=1e-5)


def _check_faithful(trained_past, model, pool):
    from features.dataset import frame_to_tensors
    from trainer.explain import explain

    schema = trained_past.schema
    rows = _planted(trained_past, 200, seed=2, cause_share=1.0)
    out = explain(model, frame_to_tensors(rows, model.feature_names, schema), None)
    top = [a.decode() for a in out["because_ad_ids"].numpy()[:, 0]]
    weights = out["because_weights"].numpy()
    rng = np.random.default_rng(0)
    other = [str(rng.choice([a for a in h if a and a != t])) for h, t in zip(rows[HISTORY], top, strict=True)]
    base = _logits(model, rows, schema)
    top_drop = base - _logits(model, _without(rows, top), schema)
    other_drop = base - _logits(model, _without(rows, other), schema)
    # The weights are the exact leave-one-out drops, and the explained ad matters more than a random one.
    np.testing.assert_allclose(weights[:, 0], top_drop, rtol=1e-3, atol=1e-4)
    wins = np.mean(top_drop > other_drop)
    assert wins >= 0.8
    assert (np.diff(weights, axis=1) <= 1e-6).all()  # best first
    # The model learned the planted cause, and the explanation names it.
    found = np.mean(np.array(top) == rows["cause"].to_numpy())
    print(f"{pool}: removing the top explained ad lowers the logit more than a random one in {wins:.0%}, "
          f"and it is the planted cause in {found:.0%}, of {len(rows)} requests")
    assert found >= 0.8


def test_explanations_load_the_tf1_way_and_match_the_model(trained_past, exported_past):
    from features.dataset import frame_to_tensors
    from trainer.explain import explain, reference_input
    from trainer.inputs import query_inputs
    from trainer.servables import RankingServable
    from trainer.serving_artifacts import as_numpy_features

    schema, model = trained_past.schema, trained_past.ranking
    reference = reference_input(model, trained_past.split.train, schema)
    meta = json.loads((exported_past.paths["ranking"] / "assets.extra" / "adrec.json").read_text())
    assert set(EXPLANATIONS) <= set(meta["outputs"]) and meta["explanations"]["groups"] == list(EXPLANATION_GROUPS)
    assert meta["explanations"]["groups_read"] == list(EXPLANATION_GROUPS)  # this model reads every group

    ranking = TF1(exported_past.paths["ranking"])
    assert set(EXPLANATIONS) <= set(ranking.sig.outputs)
    rows, feats = _ranking_request(trained_past, trained_past.split.test.head(24))
    served = ranking.run(feats)
    expected = {k: v.numpy() for k, v in explain(model, frame_to_tensors(rows, model.feature_names, schema),
                                                  reference).items()}
    assert served["because_ad_ids"].shape == (24, EXPLAINED_HISTORY)
    assert served["group_contributions"].shape == (24, len(EXPLANATION_GROUPS))
    np.testing.assert_array_equal(served["because_ad_ids"], expected["because_ad_ids"])
    for name in ("because_weights", "group_contributions"):
        np.testing.assert_allclose(served[name], expected[name], rtol=1e-4, atol=1e-5)
    for b, history in enumerate(feats[HISTORY]):  # named ads come from the request's history, "" past its end
        named = [a for a in served["because_ad_ids"][b] if a]
        assert set(named) <= {a.encode() for a in history if a} and len(named) == min(3, sum(map(bool, history)))

    # export.explanations false: the signature is what it was before them
    plain = RankingServable(model, schema, trained_past.text, explanations=False)
    assert set(plain.serve.get_concrete_function().structured_outputs) == {"pctr", "pcvr"}

    recommender = TF1(exported_past.paths["recommender"])
    picked = trained_past.split.test.iloc[[0, 7]].reset_index(drop=True)
    names = (*query_inputs(schema, trained_past.config.retrieval.history_length), *model.user_inputs)
    request = as_numpy_features(picked, tuple(dict.fromkeys(names)), schema)
    # The second request excludes all but two ads: its other slots are fillers.
    everything = trained_past.catalog[schema.ad_id].astype(str).to_numpy()
    request["excluded_ad_ids"] = np.stack([np.array([""] * (len(everything) - 2), dtype=object),
                                           everything[2:].astype(object)])
    out = recommender.run(request)
    k = out["ad_ids"].shape[1]
    assert out["because_ad_ids"].shape == (2, k, EXPLAINED_HISTORY)
    assert out["group_contributions"].shape == (2, k, len(EXPLANATION_GROUPS))
    filler = out["ad_ids"][1] == b""
    assert filler.sum() == k - 2 and (out["because_ad_ids"][1][filler] == b"").all()
    assert (out["group_contributions"][1][filler] == 0).all()
    for b in range(2):  # each returned ad's explanation is the ranking model's, for this request
        real = out["ad_ids"][b] != b""
        ads = [a.decode() for a in out["ad_ids"][b][real]]
        candidates = trained_past.catalog.set_index(schema.ad_id).loc[ads].reset_index()
        for name in (*schema.query_features, *model.user_inputs):
            candidates[name] = [picked.at[b, name]] * len(candidates)
        want = explain(model, frame_to_tensors(candidates, model.feature_names, schema), reference)
        np.testing.assert_array_equal(out["because_ad_ids"][b][real], want["because_ad_ids"].numpy())
        np.testing.assert_allclose(out["because_weights"][b][real], want["because_weights"].numpy(),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["group_contributions"][b][real], want["group_contributions"].numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_explanations_round_trip_over_grpc_and_render(trained_past, exported_past, capsys, monkeypatch):
    from serving.client import RecommendationClient
    from serving.server import EmbeddedModelServer, discover_models
    from trainer.cli import main as cli_main

    schema = trained_past.schema
    base = exported_past.paths["recommender"].parent.parent
    rows, feats = _ranking_request(trained_past, trained_past.split.test.head(5))
    expected = TF1(exported_past.paths["ranking"]).run(feats)
    test = trained_past.split.test
    row = test[test[HISTORY].map(lambda h: sum(map(bool, h)) >= 3)].iloc[0]
    history = [a for a in row[HISTORY] if a]
    # the user as `adrec recommend --feature` can give it: no negative_history list (the client sends it empty)
    user = {n: row[n] for n in (*schema.query_features, *USER_STATS)}
    with EmbeddedModelServer(discover_models(base), host="127.0.0.1", port=0) as server:
        with RecommendationClient(server.address, model_name="ranking", key_env=None) as client:
            got = client.predict(feats)
        for name in EXPLANATIONS:
            np.testing.assert_array_equal(got[name], expected[name])
        with RecommendationClient(server.address, key_env=None) as client:
            ads = client.recommend(user, {}, k=4, history=history)
        assert all(set(dict(a.because)) <= set(history) and 0 < len(a.because) <= 3 for a in ads)
        assert all(list(a.contributions) == list(EXPLANATION_GROUPS) for a in ads)
        # the client's line: positive weights as "because you clicked", then the groups that moved it most
        for a in ads:
            raised = [ad for ad, w in a.because if w > 0]
            assert a.why().startswith(f"because you clicked {raised[0]} (") if raised else \
                a.why().startswith("moved most by ")
        argv = ["recommend", "--address", server.address, "--user", str(user[schema.user_id]), "-k", "4",
                "--timeout", "10", *[f"--feature={n}={v}" for n, v in user.items() if n != schema.user_id],
                *[f"--history={a}" for a in history]]
        monkeypatch.delenv("ADREC_PSEUDONYM_KEY")  # the job's rows hold the user ids as sent already
        assert cli_main(argv) == 0
        assert capsys.readouterr().out.count("\n") == 5  # without --why: the table alone, as before
        assert cli_main([*argv, "--why"]) == 0
    table, why = capsys.readouterr().out.split("\n\nwhy:\n")
    assert [line.split()[1] for line in table.splitlines()[1:]] == [a.ad_id for a in ads]
    assert why.splitlines() == [f"{a.rank:>5}  {a.ad_id}: {a.why()}" for a in ads]


def test_rendering_reads_the_outputs_in_contract_order():
    from serving.explanations import read, render

    out = {"because_ad_ids": np.array([[[b"ad_7", b"ad_2", b""]]], dtype=object),
           "because_weights": np.array([[[0.42, -0.1, 0.0]]], np.float32),
           "group_contributions": np.array([[[0.1, 0.0, -0.3, 0.05, 0.51, 0.0]]], np.float32)}
    because, groups = read(out, 0, 0)
    assert [ad for ad, _ in because] == ["ad_7", "ad_2"] and list(groups) == list(EXPLANATION_GROUPS)
    assert render(because, groups) == "because you clicked ad_7 (+0.42); moved most by history +0.51, ad -0.30"
    assert render((("ad_2", -0.1),), {"user": 0.0}) == ""  # nothing raised the score, no group moved it
    assert read({"ad_ids": out["because_ad_ids"]}, 0, 0) == ((), {})  # a model exported without them
