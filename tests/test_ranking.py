"""Ranking like an ad server: calibration, the position tower, ESMM heads, checkpoints, and the
recommender's objectives and exclusions, on constructed cases whose right answer is known."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from features.schema import DEFAULT_SCHEMA as S
from features.vocab import build_vocabularies
from serving.contract import PAD_AD_ID
from serving.servable import Servable
from trainer.builders import build_ranking
from trainer.calibration import Calibrator, fit_knots, pool_adjacent_violators
from trainer.checkpoints import restore_parts, training_checkpoint
from trainer.config import config_from_dict
from trainer.evaluate import fit_calibration, predict_ranking, ranking_logits
from trainer.fit import build_model
from trainer.inputs import query_inputs, ranking_dataset
from trainer.metrics import expected_calibration_error
from trainer.servables import RecommenderServable
from trainer.serving_artifacts import as_numpy_features


# ---------------------------------------------------------------------------- calibration
def test_pool_adjacent_violators_is_the_monotone_least_squares_fit():
    fit = pool_adjacent_violators(np.array([1.0, 3.0, 2.0, 4.0, 0.0, 5.0]))
    np.testing.assert_allclose(fit, [1.0, 2.25, 2.25, 2.25, 2.25, 5.0])
    assert (np.diff(fit) >= 0).all()


@pytest.mark.parametrize("method", ["beta", "platt", "isotonic"])
def test_calibrator_fixes_a_known_miscalibration_in_graph(method):
    rng = np.random.default_rng(0)
    true_logit = rng.normal(-2.0, 1.0, 100_000)
    labels = (rng.random(len(true_logit)) < 1 / (1 + np.exp(-true_logit))).astype(np.float64)
    model_logit = 2.0 * true_logit + 1.5  # overconfident and biased upwards
    fit_rows, test_rows = slice(0, 50_000), slice(50_000, None)
    cal = Calibrator(64)
    cal.fit(model_logit[fit_rows], labels[fit_rows], method)
    before = expected_calibration_error(labels[test_rows], 1 / (1 + np.exp(-model_logit[test_rows])))
    in_graph = cal(tf.constant(model_logit[test_rows], tf.float32)).numpy()
    np.testing.assert_allclose(in_graph, cal.numpy_call(model_logit[test_rows]), atol=1e-5)
    after = expected_calibration_error(labels[test_rows], in_graph)
    assert before > 0.05 and after < 0.01, (before, after)
    order = np.argsort(model_logit[test_rows])
    assert (np.diff(in_graph[order]) >= -1e-7).all()  # monotone: calibration never reorders


def test_uncalibrated_knots_are_the_sigmoid():
    grid, probs = fit_knots(np.zeros(0), np.zeros(0), "none", 64)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-grid)), atol=1e-6)
    identity = Calibrator(8)
    x = np.linspace(-9, 9, 101)
    np.testing.assert_allclose(identity(tf.constant(x, tf.float32)).numpy(), 1 / (1 + np.exp(-x)), rtol=1e-5)


def test_calibrated_scores_keep_the_model_order_with_no_ties():
    """The beta map is smooth and strictly increasing everywhere, beyond the logits it was fitted on too:
    the served probabilities order candidates exactly as the logits do, with no two equal. The
    isotonic map is flat beyond its knots (and nearly flat between close ones): it ties candidates."""
    rng = np.random.default_rng(3)
    fit_logits = rng.normal(-1.0, 1.2, 20_000)
    labels = (rng.random(len(fit_logits)) < 1 / (1 + np.exp(-(0.6 * fit_logits + 0.4)))).astype(float)
    # Logits at least 1e-3 apart (closer float32 logits can share a float32 probability whatever the map),
    # spread twice as wide as the fitted ones.
    served = np.unique(np.round(rng.normal(-1.0, 2.0, 20_000), 3)).astype(np.float32)
    beta, isotonic = Calibrator(64), Calibrator(64)
    beta.fit(fit_logits, labels, "beta")
    isotonic.fit(fit_logits, labels, "isotonic")
    a, b, _ = beta.params.numpy()
    assert min(a, b) >= 0.05
    p = beta(tf.constant(served)).numpy()
    assert (np.diff(p) > 0).all()  # strictly increasing in float32: same order, no ties
    np.testing.assert_allclose(p, beta.numpy_call(served), rtol=1e-5)
    assert (np.diff(isotonic(tf.constant(served)).numpy()) == 0).sum() > 100  # plateaus beyond its knots


class _Fits(Calibrator):
    """A calibrator that records the logits of every fit."""

    def fit(self, logits, labels, method, *args):
        self.fitted = [*getattr(self, "fitted", []), np.asarray(logits).copy()]
        super().fit(logits, labels, method, *args)


@pytest.mark.parametrize("drift", [False, True])
def test_calibration_is_judged_on_rows_it_never_saw(monkeypatch, drift):
    """The map is fitted on the earlier validation rows and must lower the ECE of the latest ones, which it
    never saw; where the base rate moves between them (drift) it does not, and the head stays uncalibrated."""
    import trainer.evaluate as evaluate

    rng = np.random.default_rng(0)
    n = 8000
    logits = rng.normal(-1.0, 1.0, n)
    later = np.arange(n) >= n // 2
    shift = np.where(later, 2.0, 0.0) if drift else 0.0
    labels = (rng.random(n) < 1 / (1 + np.exp(-(0.5 * logits - 0.8 + shift)))).astype(np.float32)
    rows = pd.DataFrame({"timestamp": np.arange(n), "click": labels, "logit": logits}).sample(
        frac=1.0, random_state=1)  # in any row order: the split goes by time
    monkeypatch.setattr(evaluate, "ranking_logits", lambda model, r, schema: {"ctr": r["logit"].to_numpy()})

    class Model:
        ctr_calibrator, cvr_calibrator, use_conversion = _Fits(64), _Fits(64), False

    schema = dataclasses.replace(S, conversion="")
    report = fit_calibration(Model, rows, schema, "beta", half_life=0.25, check_fraction=0.5)
    check = rows["timestamp"].to_numpy() >= n // 2
    first_fit = Model.ctr_calibrator.fitted[0]
    assert sorted(first_fit) == sorted(rows["logit"][~check])  # fitted on the earlier half only
    assert report["ctr_check_rows"] == check.sum() == n // 2
    y, x = rows["click"][check].to_numpy(), rows["logit"][check].to_numpy()
    assert report["ctr_check_ece_uncalibrated"] == pytest.approx(expected_calibration_error(y, 1 / (1 + np.exp(-x))))
    assert report["ctr_applied"] is (not drift)
    if drift:  # the earlier rows' map hurts the later ones: not applied, pCTR is sigmoid(logit)
        assert report["ctr_check_ece_calibrated"] > report["ctr_check_ece_uncalibrated"]
        assert len(Model.ctr_calibrator.fitted) == 2 and len(Model.ctr_calibrator.fitted[1]) == 0  # the reset
        np.testing.assert_allclose(Model.ctr_calibrator.numpy_call(x), 1 / (1 + np.exp(-x)), rtol=1e-5)
    else:  # it helps on rows it never saw: refitted on all the validation rows and applied
        assert report["ctr_check_ece_calibrated"] < report["ctr_check_ece_uncalibrated"]
        assert len(Model.ctr_calibrator.fitted[-1]) == n


# ------------------------------------------------- a constructed world with known position bias
RELEVANCE = {"good": 0.30, "bad": 0.15}
FILLERS = {f"f{i}": r for i, r in enumerate(np.linspace(0.08, 0.4, 10))}


def _examination(position):
    return 1.0 / np.asarray(position, np.float64) ** 0.8


def _constructed(n=24_000, seed=0):
    """`bad` (relevance 0.15) is shown at position 1 nine times in ten, `good` (0.30) at position 4;
    fillers at uniform positions teach the position effect. Logged CTR: bad 0.14 > good 0.12."""
    rng = np.random.default_rng(seed)
    ads = {**RELEVANCE, **FILLERS}
    catalog = pd.DataFrame({"ad_id": list(ads), "advertiser_id": [f"adv_{a}" for a in ads],
                            "campaign_id": [f"cmp_{a}" for a in ads], "category": "same",
                            "title": [f"ad {a}" for a in ads], "description": "words", "bid": 1.0})
    ad = rng.choice(list(ads), size=n, p=[0.2, 0.2] + [0.06] * 10)
    usual = np.where(ad == "bad", 1, np.where(ad == "good", 4, 0))
    position = np.where(usual == 0, rng.integers(1, 6, n),
                        np.where(rng.random(n) < 0.9, usual, rng.integers(1, 6, n)))
    relevance = np.array([ads[a] for a in ad])
    click = rng.random(n) < relevance * _examination(position)
    logs = pd.DataFrame({"user_id": rng.choice([f"u{i}" for i in range(20)], n), "age_bucket": "25-34",
                         "gender": "f", "region": "r1", "device": rng.choice(["mobile", "desktop"], n),
                         "placement": "feed", "hour": rng.integers(0, 24, n), "weekday": rng.integers(0, 7, n),
                         "ad_id": ad, "position": position.astype(np.int64),
                         "timestamp": np.arange(n, dtype=np.int64), "click": click.astype(np.float32),
                         "conversion": (click & (rng.random(n) < 0.3)).astype(np.float32)})
    logs = logs.merge(catalog[["ad_id", "advertiser_id", "campaign_id", "category"]], on="ad_id")
    return catalog, logs.sort_values("timestamp").reset_index(drop=True)


def _train(catalog, logs, **ranking):
    cfg = config_from_dict({"ranking": {"epochs": 4, "batch_size": 256, "learning_rate": 0.01,
                                        "deep_units": [16], "calibration": "none", **ranking}})
    vocab = build_vocabularies(logs, catalog, S)
    strategy = tf.distribute.get_strategy()
    tf.keras.utils.set_random_seed(1)
    model = build_ranking(cfg, strategy, S, vocab, catalog, np.zeros((len(catalog), 4), np.float32), logs)
    ds = ranking_dataset(logs, cfg, S)
    build_model(model, next(iter(ds)), strategy)
    model.fit(ds, epochs=cfg.ranking.epochs, verbose=0)
    return model, cfg


def _served(model, catalog, ad_ids):
    rows = pd.DataFrame([{"user_id": "u1", "age_bucket": "25-34", "gender": "f", "region": "r1",
                          "device": "mobile", "placement": "feed", "hour": 12, "weekday": 3, "ad_id": a}
                         for a in ad_ids]).merge(catalog, on="ad_id")
    return dict(zip(ad_ids, predict_ranking(model, rows, S)["pctr"], strict=True))


@pytest.fixture(scope="module")
def constructed():
    return _constructed()


def test_dropping_the_position_tower_recovers_the_unbiased_order(constructed):
    catalog, logs = constructed
    logged = logs.groupby("ad_id").click.mean()
    assert logged["bad"] > logged["good"]  # the logs favour the less relevant ad
    with_tower, _ = _train(catalog, logs, position_tower=True)
    without, _ = _train(catalog, logs, position_tower=False)
    assert with_tower.position_tower is not None and without.position_tower is None
    served = _served(with_tower, catalog, ["good", "bad"])
    biased = _served(without, catalog, ["good", "bad"])
    assert served["good"] > served["bad"], served  # position tower dropped: true relevance order
    assert biased["bad"] > biased["good"], biased  # no position tower: the logged bias stays
    # The learnt position logits fall with the position, like the examination probability.
    pos = with_tower.position_tower(tf.constant([1, 2, 3, 4, 5], tf.int64),
                                    {"device": tf.constant(["mobile"] * 5), "placement": tf.constant(["feed"] * 5)})
    assert (np.diff(pos.numpy()) < 0).sum() >= 3 and pos.numpy()[0] - pos.numpy()[4] > 0.5


def test_checkpoint_carries_heads_position_tower_and_calibrators(constructed, tmp_path):
    catalog, logs = constructed
    model, cfg = _train(catalog, logs.head(4000), epochs=1, calibration="platt")
    logits = ranking_logits(model, logs.tail(4000), S)
    model.ctr_calibrator.fit(logits["ctr"], logs.tail(4000)["click"].to_numpy(), "beta")
    model.cvr_calibrator.fit(logits["cvr"], logs.tail(4000)["conversion"].to_numpy(), "isotonic")
    before = predict_ranking(model, logs.tail(200), S)
    path = training_checkpoint(None, model).write(str(tmp_path / "ckpt"))
    fresh = build_ranking(cfg, tf.distribute.get_strategy(), S, build_vocabularies(logs.head(4000), catalog, S),
                          catalog, np.zeros((len(catalog), 4), np.float32), logs)
    build_model(fresh, next(iter(ranking_dataset(logs.head(64), cfg, S, False))), tf.distribute.get_strategy())
    assert {"position_tower", "heads", "ctr_calibrator", "cvr_calibrator"} <= set(fresh.checkpoint_parts())
    restore_parts(path, ranking=fresh)
    after = predict_ranking(fresh, logs.tail(200), S)
    for key in ("pctr", "pcvr", "pctr_with_position"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------- the recommender: objectives and exclusions (TF1 load)
TWINS = {"twin-lo": 1.0, "twin-hi": 5.0}


def _with_twins(trained):
    """Two new ads identical in every feature but the bid (both ids unseen: the same OOV embeddings,
    the same text), so their pCTR, pCVR and retrieval scores are equal by construction."""
    schema = trained.schema
    source = trained.catalog.iloc[0]
    twins = pd.DataFrame([{**source.to_dict(), schema.ad_id: a, schema.bid: b, "is_cold_start": True}
                          for a, b in TWINS.items()])
    catalog = pd.concat([trained.catalog, twins], ignore_index=True)
    text = np.concatenate([trained.catalog_text_embeddings, trained.catalog_text_embeddings[:1].repeat(2, 0)])
    return dataclasses.replace(trained, catalog=catalog, catalog_text_embeddings=text)


def _serve_recommender(trained, objective, tmp_path, retrieve_n=None, k=None):
    n = retrieve_n or len(trained.catalog)
    module = RecommenderServable(trained, n, k or n, objective)
    path = tmp_path / f"recommender-{objective}-{n}-{k}"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return Servable("recommender", 1, path)  # tf.compat.v1.saved_model.loader.load + session.run


def _query(trained, n=3, exclude=()):
    rows = trained.split.test.iloc[:n]
    feats = as_numpy_features(rows, query_inputs(trained.schema, trained.config.retrieval.history_length),
                              trained.schema)
    width = max(1, len(exclude))
    feats["excluded_ad_ids"] = np.array([list(exclude) + [""] * (width - len(exclude))] * n, dtype=object)
    return feats


def _ids(out, b):
    return [i.decode() for i in out["ad_ids"][b]]


def test_ecpm_puts_the_higher_bid_first_and_exclusions_never_come_back(trained_tiny, tmp_path):
    trained = _with_twins(trained_tiny)
    ecpm = _serve_recommender(trained, "ecpm", tmp_path)
    pctr_only = _serve_recommender(trained, "pctr", tmp_path)
    try:
        out = ecpm.run(_query(trained))
        for b in range(3):
            ids = _ids(out, b)
            lo, hi = ids.index("twin-lo"), ids.index("twin-hi")
            assert out["pctr"][b][lo] == pytest.approx(out["pctr"][b][hi], abs=1e-7)  # same pCTR
            assert hi < lo  # higher bid first
            bids = trained.catalog.set_index("ad_id").loc[ids, "bid"].to_numpy()
            np.testing.assert_allclose(out["score"][b], bids * out["pctr"][b], rtol=1e-5)
            assert (np.diff(out["score"][b]) <= 1e-7).all()
        assert (np.diff(pctr_only.run(_query(trained))["pctr"], axis=1) <= 1e-7).all()
        excluded = ["twin-hi", next(a for a in _ids(out, 0) if a != "twin-hi"), "not-an-ad"]
        shown = ecpm.run(_query(trained, exclude=excluded))
        for b in range(3):
            ids = _ids(shown, b)
            assert not set(ids) & set(excluded)
            assert ids[-2:] == [PAD_AD_ID, PAD_AD_ID]  # the whole catalog minus 2 real ads: 2 pads
            assert list(shown["score"][b][-2:]) == [0.0, 0.0]
    finally:
        ecpm.close()
        pctr_only.close()


def test_recommender_retrieves_enough_to_return_k_after_exclusions(trained_tiny, tmp_path):
    servable = _serve_recommender(trained_tiny, "ecpm", tmp_path, retrieve_n=10, k=10)
    try:
        first = servable.run(_query(trained_tiny, 1))
        excluded = _ids(first, 0)[:5]
        again = servable.run(_query(trained_tiny, 1, exclude=excluded))
        ids = _ids(again, 0)
        assert len(ids) == 10 and PAD_AD_ID not in ids and not set(ids) & set(excluded)
        kept = [a for a in ids if a in _ids(first, 0)]
        assert kept == _ids(first, 0)[5:]  # the other five stay, in their order; five more fill in
    finally:
        servable.close()
