"""Training on real-format logs through a data spec: the spec's schema flows into the models,
the export and the served graphs; unseen ids still get recommendations."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from serving.pseudonym import pseudonym
from tests.conftest import ROOT, tiny_config

ML_LATEST_SMALL = ROOT.parent / "shared" / "data" / "ml-latest-small"


@pytest.fixture(scope="module")
def trained_mind(tmp_path_factory):
    from trainer.job import run_training

    cfg = tiny_config(tmp_path_factory.mktemp("mind"),
                      data={"source": "spec", "spec": str(ROOT / "configs/data/mind.yaml"),
                            "root": str(ROOT / "tests/fixtures/mind")},
                      retrieval={"epochs": 2, "batch_size": 128}, ranking={"epochs": 2, "batch_size": 256},
                      export={"top_k": 20, "retrieve_n": 20, "recommend_k": 5})
    return run_training(cfg, progress=False)


def test_mind_schema_flows_through_training(trained_mind):
    s = trained_mind.schema
    assert s.ad_categoricals == ("category", "subcategory") and s.ad_text == ("title", "abstract")
    assert s.user_categoricals == () and s.context_categoricals == () and s.query_features == (
        "user_id", "hour", "weekday")
    assert set(trained_mind.vocabularies.values) == {"user_id", "hour", "weekday", "ad_id", "category",
                                                     "subcategory"}
    r, k = trained_mind.metrics["retrieval"], trained_mind.metrics["ranking"]
    assert r["catalog_size"] == 72 and r["cold_test_positives"] > 0
    assert 0.0 <= r["model"]["recall@10"] <= 1.0 and 0.0 < k["auc"] < 1.0
    assert k["test_impressions"] == len(trained_mind.split.test)


def test_mind_export_serves_unseen_user_and_cold_ads(trained_mind):
    from serving.servable import Servable
    from trainer.export import export_all

    result = export_all(trained_mind, trained_mind.config.export.export_dir)
    meta = json.loads((result.paths["recommender"] / "assets.extra" / "adrec.json").read_text())
    n = trained_mind.config.retrieval.history_length
    assert meta["inputs"] == {"user_id": "string", "hour": "int64", "weekday": "int64",
                              "history": f"string [batch, {n}]",
                              "excluded_ad_ids": "string [batch, M], padded with ''"}
    request = {"user_id": np.array(["U_never_seen", "U1"], dtype=object),
               "hour": np.array([3, 30], dtype=np.int64), "weekday": np.array([6, 9], dtype=np.int64),
               "history": np.full((2, n), "", dtype=object),
               "excluded_ad_ids": np.array([[""], [""]], dtype=object)}
    assert "U_never_seen" not in trained_mind.vocabularies["user_id"]
    out = Servable("recommender", result.version, result.paths["recommender"]).run(request)
    ids = out["ad_ids"].astype(str)
    assert ids.shape == (2, 5) and set(ids.ravel()) <= set(trained_mind.catalog["ad_id"])
    assert np.isfinite(out["pctr"]).all()
    # a cold-start ad (never in training) is scored by the ranking graph from its raw text
    cold = sorted(trained_mind.split.cold_ad_ids(trained_mind.schema))[0]
    ad = trained_mind.catalog.set_index("ad_id").loc[cold]
    rank_req = {"user_id": np.array(["U_never_seen"], dtype=object), "hour": np.array([3]),
                "weekday": np.array([6]), "ad_id": np.array([cold], dtype=object)}
    for col in ("category", "subcategory", "title", "abstract"):
        rank_req[col] = np.array([ad[col]], dtype=object)
    served = Servable("ranking", result.version, result.paths["ranking"]).run(rank_req)
    pctr = served["pctr"]
    assert pctr.shape == (1,) and 0.0 < float(pctr[0]) < 1.0
    assert trained_mind.ranking.position_tower is not None  # MIND logs carry the shown position
    assert list(served["pcvr"]) == [1.0]  # no conversion labels: pCVR is a constant 1


def test_users_table_columns_reach_the_models_through_the_ml_100k_spec(tmp_path):
    """u.user's columns are query features: in the schema, the vocabularies (with "" for the rows of
    users missing from u.user) and the retrieval signature."""
    from trainer.inputs import query_inputs
    from trainer.job import run_training

    rng = np.random.default_rng(0)
    flags = ["0"] * 19
    (tmp_path / "u.item").write_text("".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|{'|'.join(flags)}\n"
                                             for i in range(1, 41)))
    (tmp_path / "u.user").write_text("".join(f"{u}|{20 + u % 40}|{'MF'[u % 2]}|{('writer', 'student')[u % 3 > 0]}|"
                                             f"{10000 + u}\n" for u in range(1, 51)))
    (tmp_path / "u.data").write_text("".join(f"{u}\t{m}\t{rng.integers(1, 6)}\t{880000000 + rng.integers(0, 10**6)}\n"
                                             for u in range(1, 56) for m in rng.choice(40, 20, replace=False) + 1))
    cfg = tiny_config(tmp_path, data={"source": "spec", "spec": str(ROOT / "configs/data/ml-100k.yaml"),
                                      "root": str(tmp_path)},
                      retrieval={"epochs": 1, "batch_size": 128}, evaluation={"baselines": ("most_popular",)},
                      ranking={"epochs": 1, "batch_size": 256})
    trained = run_training(cfg, progress=False)
    users = ("age", "gender", "occupation", "zip_code")
    assert trained.schema.user_categoricals == users
    assert set(query_inputs(trained.schema, cfg.retrieval.history_length)) >= {"user_id", *users}
    assert set(trained.vocabularies["gender"]) == {"M", "F", ""}  # "": users 51..55 are not in u.user
    assert set(trained.vocabularies["occupation"]) == {"writer", "student", ""}
    train = trained.split.train
    key = os.environ["ADREC_PSEUDONYM_KEY"].encode()  # the job's (conftest): user ids arrive as pseudonyms
    not_in_u_user = {pseudonym(str(u), key) for u in range(51, 56)}
    assert train["user_id"].isin(not_in_u_user).any()
    assert (train.loc[train["user_id"].isin(not_in_u_user), list(users)] == "").all().all()
    assert 0.0 < trained.metrics["ranking"]["auc"] < 1.0


@pytest.mark.skipif(not (ML_LATEST_SMALL / "ratings.csv").exists(),
                    reason=f"MovieLens ml-latest-small not found at {ML_LATEST_SMALL}")
def test_adrec_train_on_movielens_subset_through_its_spec(tmp_path, capsys):
    from trainer.cli import main

    data = tmp_path / "ml-subset"
    data.mkdir()
    ratings = pd.read_csv(ML_LATEST_SMALL / "ratings.csv")
    kept = ratings[ratings["userId"] <= 80]
    kept.to_csv(data / "ratings.csv", index=False)
    # Only the movies the kept users rated: the frozen MiniLM embeds every catalog movie, and the
    # others (about 60 % of the 9,742) would never appear in these logs.
    movies = pd.read_csv(ML_LATEST_SMALL / "movies.csv")
    movies[movies["movieId"].isin(kept["movieId"])].to_csv(data / "movies.csv", index=False)
    shutil.copy(ML_LATEST_SMALL / "README.txt", data)  # the license asks to keep the README beside any copy
    cfg = yaml.safe_load((ROOT / "configs" / "movielens.yaml").read_text())
    cfg["data"]["spec"] = str(ROOT / cfg["data"]["spec"])
    cfg["data"]["root"] = str(data)
    cfg["retrieval"]["epochs"] = cfg["ranking"]["epochs"] = 1
    cfg["training"]["model_dir"] = str(tmp_path / "run")
    config = tmp_path / "movielens.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(config), "--no-export", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "ratings.csv" in captured.err and "skipped rows: none" in captured.err  # the data report is a log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert json.loads(captured.out) == json.loads(json.dumps(metrics))  # stdout: the metrics only
    n = len(kept)
    assert metrics["retrieval"]["catalog_size"] == kept["movieId"].nunique()
    assert 0.15 * n < metrics["ranking"]["test_impressions"] < 0.25 * n
    assert 0.0 < metrics["ranking"]["auc"] < 1.0
