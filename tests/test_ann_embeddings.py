"""benchmarks/trained_embeddings.py (a trained model's ad and query embeddings) and `benchmarks/ann.py
--embeddings`, which measures the IVF index on them."""

import importlib.util
import json
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def _benchmark(monkeypatch, name):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_queries_are_one_held_out_request_per_user_embedded_by_the_trained_towers(trained_tiny, monkeypatch):
    from trainer.evaluate import ad_embeddings, query_embeddings

    module = _benchmark(monkeypatch, "trained_embeddings")
    schema, test = trained_tiny.schema, trained_tiny.split.test
    out = module.extract(trained_tiny, 12, seed=3)
    assert out["ads"].shape == (len(trained_tiny.catalog), trained_tiny.config.retrieval.embedding_dim)
    np.testing.assert_allclose(out["ads"], ad_embeddings(trained_tiny.retrieval, trained_tiny.catalog, schema),
                               atol=1e-6)
    assert list(out["ad_ids"]) == trained_tiny.catalog[schema.ad_id].astype(str).tolist()
    users = list(out["user_ids"])
    assert len(users) == len(set(users)) == 12 and out["queries"].shape == (12, out["ads"].shape[1])
    rows = module.query_rows(test, schema.user_id, schema.timestamp, 12, seed=3)
    for user, (_, row) in zip(users, rows.iterrows(), strict=True):  # each user's earliest held-out row
        assert row[schema.user_id] == user
        assert row[schema.timestamp] == test.loc[test[schema.user_id] == user, schema.timestamp].min()
    np.testing.assert_allclose(out["queries"], query_embeddings(trained_tiny.retrieval, rows, schema), atol=1e-6)
    assert not np.array_equal(rows[schema.user_id], module.query_rows(test, schema.user_id, schema.timestamp, 12,
                                                                      seed=4)[schema.user_id])
    everyone = module.query_rows(test, schema.user_id, schema.timestamp, 10**6, seed=0)
    assert sorted(everyone[schema.user_id]) == sorted(test[schema.user_id].unique())


def test_ann_refuses_an_embeddings_file_it_cannot_measure(monkeypatch, tmp_path):
    ann = _benchmark(monkeypatch, "ann")
    ads, queries = np.ones((50, 8), np.float32), np.ones((64, 8), np.float32)
    cases = {"no_queries": ({"ads": ads}, "no array"),
             "widths": ({"ads": ads, "queries": queries[:, :4]}, "8-d but queries 4-d"),
             "flat": ({"ads": ads[0], "queries": queries}, "2-D float"),
             "ints": ({"ads": ads.astype(np.int32), "queries": queries}, "2-D float"),
             "nan": ({"ads": np.where(np.eye(50, 8) > 0, np.nan, ads), "queries": queries}, "NaN"),
             "few": ({"ads": ads, "queries": queries[:10]}, "fewer than the largest --batch"),
             "objects": ({"ads": ads, "queries": np.array([None] * 64, dtype=object)}, "cannot read")}
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(SystemExit, match=message):
            ann.load_embeddings(tmp_path / f"{name}.npz", 64)
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(SystemExit, match="cannot read"):
        ann.load_embeddings(tmp_path / "text.npz", 64)
    np.savez(tmp_path / "good.npz", ads=ads.astype(np.float64), queries=queries)
    got_ads, got_queries = ann.load_embeddings(tmp_path / "good.npz", 64)
    assert got_ads.dtype == np.float32 and got_ads.shape == (50, 8) and got_queries.shape == (64, 8)


def test_ann_measures_the_trained_embeddings_exactly_when_every_partition_is_probed(trained_tiny, monkeypatch,
                                                                                    tmp_path):
    out = _benchmark(monkeypatch, "trained_embeddings").extract(trained_tiny, 64, seed=0)
    np.savez(tmp_path / "emb.npz", **out)
    ann = _benchmark(monkeypatch, "ann")
    report_path = tmp_path / "ann.json"
    assert ann.main(["--embeddings", str(tmp_path / "emb.npz"), "--partitions", "8", "--nprobe", "2", "8",
                     "--storage", "float32", "-k", "20", "--min-calls", "2", "--min-seconds", "0.05", "--rounds", "1",
                     "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["source"] == "trained" and report["queries"] == len(out["queries"])
    rows = {(r["method"], r.get("nprobe")): r for r in report["results"]}
    assert {r["n_ads"] for r in report["results"]} == {len(trained_tiny.catalog)}
    assert rows[("ivf", 8)]["recall"] == 1.0 and rows[("ivf", 8)]["partitions"] == 8
    assert rows[("ivf", 2)]["recall"] < 1.0
    ivf = rows[("ivf", 2)]  # every query's exact top 20 lies within its 8 best partitions
    assert 1 <= ivf["top_partitions_mean"] <= 8 and 1 <= ivf["nprobe_covering_top_median"] <= 8
    assert ("brute_force", None) in rows
    with pytest.raises(SystemExit):  # the file's catalog, not synthetic sizes
        ann.main(["--embeddings", str(tmp_path / "emb.npz"), "--ads", "10", "--out", str(report_path)])


def test_top_spread_counts_the_partitions_holding_the_exact_top_and_the_probes_covering_it(monkeypatch):
    from trainer.ivf_index import build_layout

    ann = _benchmark(monkeypatch, "ann")
    # Four tight clusters on the axes: k-means puts each in its own partition.
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8, dtype=np.float32)
    ads = np.repeat(centres, 10, axis=0) + rng.normal(0, 0.01, (40, 8)).astype(np.float32)
    ads /= np.linalg.norm(ads, axis=1, keepdims=True)
    layout = build_layout(ads, 4, seed=0)
    assert sorted(layout.sizes) == [10, 10, 10, 10]
    query = np.array([[1.0, 0.6, 0, 0, 0, 0, 0, 0]], np.float32)  # nearest cluster 0, then cluster 1
    exact = np.argsort(-(query @ ads.T), axis=1)
    within = ann.top_spread(layout, query, exact[:, :10])  # all of cluster 0: one partition, the best
    assert within["top_partitions_mean"] == 1 and within["nprobe_covering_top_median"] == 1
    across = ann.top_spread(layout, query, exact[:, :15])  # and 5 of cluster 1: the second best partition
    assert across["top_partitions_mean"] == 2 and across["nprobe_covering_top_median"] == 2
    spread_out = ann.top_spread(layout, query, np.array([[0, 10, 20, 30]]))  # one ad of each cluster
    assert spread_out["top_partitions_mean"] == 4 and spread_out["nprobe_covering_top_p90"] == 4
