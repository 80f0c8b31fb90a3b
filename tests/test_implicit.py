"""Implicit feedback (every log row a positive): ranking trains and is evaluated on sampled negatives,
labelled as such, and an AUC that cannot be computed says why instead of printing NaN."""

import json

import numpy as np
import pandas as pd
import pytest

from features.negatives import SAMPLED_NEGATIVE, sample_negatives
from features.schema import FeatureSchema
from tests.conftest import ROOT, tiny_config
from trainer.config import ConfigError
from trainer.labels import ranking_label_notes

SCHEMA = FeatureSchema(user_categoricals=("gender",), context_categoricals=(), context_integers=("hour",),
                       ad_categoricals=("genre",), ad_text=("title",), bid="", position="", conversion="")
CATALOG = pd.DataFrame({"ad_id": [f"m{i}" for i in range(8)], "genre": list("aabbccdd"),
                        "title": [f"Movie {i}" for i in range(8)]})


def _rows(pairs):
    return pd.DataFrame({"user_id": [u for u, _ in pairs], "gender": ["f" if u == "u1" else "m" for u, _ in pairs],
                         "hour": np.arange(len(pairs), dtype=np.int64), "ad_id": [a for _, a in pairs],
                         "genre": [CATALOG.set_index("ad_id").at[a, "genre"] for _, a in pairs],
                         "timestamp": np.arange(len(pairs), dtype=np.int64) * 10,
                         "click": np.ones(len(pairs), np.float32)})


def test_sampled_negatives_follow_their_positive_and_avoid_the_users_positives():
    rows = _rows([("u1", "m0"), ("u1", "m1"), ("u2", "m2"), ("u1", "m3")])
    pool = ["m0", "m1", "m2", "m3", "m4", "m5"]  # m6, m7: never seen in training, never drawn
    out = sample_negatives(rows, CATALOG, SCHEMA, 3, pool, rows[["user_id", "ad_id"]], seed=1)
    assert len(out) == 4 * 4 and out[SAMPLED_NEGATIVE].sum() == 12
    assert out["click"].tolist() == [1, 0, 0, 0] * 4 and out["click"].dtype == np.float32
    for i in range(4):  # each positive, then its three negatives with its query side
        block = out.iloc[4 * i: 4 * i + 4]
        assert block[["user_id", "gender", "hour", "timestamp"]].nunique().tolist() == [1, 1, 1, 1]
        assert block["user_id"].iloc[0] == rows["user_id"].iloc[i] and block["ad_id"].iloc[0] == rows["ad_id"].iloc[i]
    negatives = out[out[SAMPLED_NEGATIVE]]
    assert set(negatives["ad_id"]) <= set(pool)
    assert not set(negatives.loc[negatives["user_id"] == "u1", "ad_id"]) & {"m0", "m1", "m3"}
    assert "m2" not in set(negatives.loc[negatives["user_id"] == "u2", "ad_id"])
    assert (negatives["genre"] == negatives["ad_id"].map(CATALOG.set_index("ad_id")["genre"])).all()
    again = sample_negatives(rows, CATALOG, SCHEMA, 3, pool, rows[["user_id", "ad_id"]], seed=1)
    pd.testing.assert_frame_equal(out, again)  # seeded
    other = sample_negatives(rows, CATALOG, SCHEMA, 3, pool, rows[["user_id", "ad_id"]], seed=2)
    assert other["ad_id"].tolist() != out["ad_id"].tolist()


def test_sampled_negatives_are_uniform_over_the_allowed_ads():
    rows = _rows([("u1", "m0")] * 4000)
    pool = [f"m{i}" for i in range(6)]
    out = sample_negatives(rows, CATALOG, SCHEMA, 2, pool, rows[["user_id", "ad_id"]].head(1), seed=0)
    counts = out.loc[out[SAMPLED_NEGATIVE], "ad_id"].value_counts()
    assert set(counts.index) == {"m1", "m2", "m3", "m4", "m5"}  # m0 is the user's positive
    assert counts.min() > 0.9 * 8000 / 5 and counts.max() < 1.1 * 8000 / 5


def test_a_user_with_every_candidate_as_a_positive_gets_no_negatives():
    rows = _rows([("u1", "m0"), ("u1", "m1"), ("u2", "m0")])
    out = sample_negatives(rows, CATALOG, SCHEMA, 2, ["m0", "m1"], rows[["user_id", "ad_id"]], seed=0)
    negatives = out[out[SAMPLED_NEGATIVE]]
    assert set(negatives["user_id"]) == {"u2"} and set(negatives["ad_id"]) == {"m1"} and len(negatives) == 2


def test_undefined_aucs_say_why_and_sampled_negatives_are_labelled():
    cfg = tiny_config(ROOT / "runs" / "unused")
    test = _rows([("u1", "m0"), ("u2", "m1")])
    notes = ranking_label_notes({"auc": float("nan"), "auc_with_position": float("nan"), "logloss": 0.1},
                                test, SCHEMA, cfg)
    assert notes == {"negatives": "logged",
                     "auc_undefined": "all 2 test impressions are positives; AUC needs both classes",
                     "auc_with_position_undefined": "all 2 test impressions are positives; AUC needs both classes"}
    sampled = sample_negatives(test, CATALOG, SCHEMA, 4, CATALOG["ad_id"], test[["user_id", "ad_id"]], seed=0)
    notes = ranking_label_notes({"auc": 0.7}, sampled, SCHEMA, cfg)
    assert notes == {"negatives": "sampled", "sampled_negatives_per_positive": cfg.ranking.sampled_negatives,
                     "test_positives": 2, "test_sampled_negatives": 8}

    from trainer.demo import format_ranking_metrics

    k = {"test_impressions": 2, "auc": float("nan"), "logloss": 0.1, "ece": 0.0, "ece_uncalibrated": 0.0,
         "mean_pctr": 0.5, "ctr": 1.0, "auc_undefined": "all 2 test impressions are positives; AUC needs both classes"}
    line = format_ranking_metrics(k)[0]
    assert "CTR AUC undefined (all 2 test impressions are positives; AUC needs both classes)" in line
    assert "nan" not in line


def write_implicit_movielens(root, n_users=60, n_movies=50, per_user=30, seed=0):
    """ratings.csv + movies.csv in ml-latest's format: users mostly pick movies of their two genres."""
    rng = np.random.default_rng(seed)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance"]
    movie_genre = rng.integers(0, len(genres), n_movies)
    pd.DataFrame({"movieId": np.arange(1, n_movies + 1),
                  "title": [f"{genres[g]} story {i} ({1990 + i % 20})" for i, g in enumerate(movie_genre)],
                  "genres": [genres[g] for g in movie_genre]}).to_csv(root / "movies.csv", index=False)
    rows = []
    for u in range(1, n_users + 1):
        liked = rng.choice(len(genres), 2, replace=False)
        weights = np.where(np.isin(movie_genre, liked), 8.0, 1.0)
        movies = rng.choice(n_movies, per_user, replace=False, p=weights / weights.sum()) + 1
        times = 1_500_000_000 + np.sort(rng.integers(0, 86_400 * 60, per_user))
        rows += [(u, m, float(rng.integers(1, 11)) / 2, t) for m, t in zip(movies, times, strict=True)]
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(root / "ratings.csv", index=False)


def test_implicit_spec_with_zero_sampled_negatives_is_refused_before_reading(tmp_path):
    from trainer.prepare import load_job_data

    cfg = tiny_config(tmp_path, data={"source": "spec", "root": str(tmp_path / "nothing-here"),
                                      "spec": str(ROOT / "configs" / "data" / "ml-latest-small-implicit.yaml")},
                      ranking={"sampled_negatives": 0})
    with pytest.raises(ConfigError, match=r"^ranking.sampled_negatives is 0, but data spec 'ml-latest-small-implicit' "
                                          r"has implicit labels \(every log row is a positive\): the ranking stage "
                                          r"needs negatives; set it >= 1"):
        load_job_data(cfg)


def test_adrec_train_on_implicit_feedback_trains_ranking_on_sampled_negatives_and_exports(tmp_path, capsys):
    from trainer.cli import main

    data = tmp_path / "data"
    data.mkdir()
    write_implicit_movielens(data)
    metrics_file = tmp_path / "metrics.json"
    sets = ["encoder.preset=tiny", "encoder.sequence_length=16", "retrieval.epochs=2", "retrieval.batch_size=128",
            "evaluation.baselines=[most_popular]", "ranking.epochs=2", "ranking.batch_size=256",
            "ranking.sampled_negatives=3", f"training.model_dir={tmp_path / 'run'}",
            f"export.export_dir={tmp_path / 'models'}", "export.top_k=20", "export.retrieve_n=20",
            "export.recommend_k=5"]
    assert main(["train", "--config", str(ROOT / "configs" / "ml-latest-small-implicit.yaml"), "--root", str(data),
                 "--quiet", "--metrics-out", str(metrics_file), *[a for s in sets for a in ("--set", s)]]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(metrics_file.read_text())
    assert json.loads(captured.out) == metrics
    k = metrics["ranking"]
    assert k["negatives"] == "sampled" and k["sampled_negatives_per_positive"] == 3
    assert k["test_sampled_negatives"] == 3 * k["test_positives"]
    assert k["test_impressions"] == 4 * k["test_positives"] and k["ctr"] == pytest.approx(0.25)
    assert 0.0 < k["auc"] < 1.0 and not any(key.endswith("_undefined") for key in k)
    assert metrics["retrieval"]["test_positives"] == k["test_positives"]  # retrieval sees positives only
    assert "ranking negatives: implicit labels (every log row is a positive); sampled 3 per positive" in captured.err
    assert "sampled negatives each" in captured.err and "nan" not in captured.err.lower()
    for model in ("retrieval", "ranking", "recommender"):  # export still works: ranking was trained
        assert (tmp_path / "models" / model / "1" / "saved_model.pb").is_file()
