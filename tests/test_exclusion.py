"""The recommender's exclusions (trainer/exclusion.py): the graph's pieces against numpy on random
cases, then the exported recommender against a numpy reference of its contract on a batch with
many exclusions, duplicates, unknown ids and pads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.contract import EXCLUDED_AD_IDS, PAD_AD_ID
from serving.servable import Servable
from trainer.exclusion import CatalogRows, distinct_known, first_allowed, is_excluded
from trainer.inputs import query_inputs
from trainer.servables import ExportError, RecommenderServable
from trainer.serving_artifacts import as_numpy_features

CATALOG = [f"c{i}" for i in range(12)]
TABLE = CatalogRows(CATALOG)


@st.composite
def cases(draw):
    """(excluded ids [B, M], fetched candidate rows [B, fetch] distinct per request, n)."""
    batch, width = draw(st.integers(1, 4)), draw(st.integers(0, 15))
    fetch = draw(st.integers(1, len(CATALOG)))
    ids = st.sampled_from([*CATALOG, PAD_AD_ID, "unknown", "c12"])
    excluded = [[draw(ids) for _ in range(width)] for _ in range(batch)]
    rows = [draw(st.permutations(range(len(CATALOG))))[:fetch] for _ in range(batch)]
    return np.array(excluded, dtype=object).reshape(batch, width), np.array(rows, np.int32), draw(
        st.integers(1, fetch))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(cases())
def test_exclusion_pieces_match_numpy(case):
    excluded, rows, n = case
    sorted_rows = TABLE.sorted_rows(tf.constant(excluded, tf.string))
    known = [{CATALOG.index(a) for a in request if a in CATALOG} for request in excluded]
    assert distinct_known(sorted_rows).numpy().tolist() == [len(k) for k in known]
    hit = is_excluded(sorted_rows, tf.constant(rows)).numpy()
    np.testing.assert_array_equal(hit, [[r in k for r in request] for request, k in zip(rows, known, strict=True)])
    columns, valid = (t.numpy() for t in first_allowed(tf.constant(~hit), n))
    for b in range(len(rows)):
        allowed = np.flatnonzero(~hit[b])[:n]
        assert valid[b].tolist() == [True] * len(allowed) + [False] * (n - len(allowed))
        assert columns[b][:len(allowed)].tolist() == allowed.tolist()


def test_a_catalog_the_table_cannot_key_is_refused():
    with pytest.raises(ValueError, match="lists an ad id twice"):
        CatalogRows(["a", "b", "a"])
    with pytest.raises(ValueError, match="lists the ad id '', which requests use as padding"):
        CatalogRows(["a", ""])


def _reference(every: dict, excluded: np.ndarray, catalog: list[str], n: int, k: int) -> dict[str, list]:
    """The recommender's contract in numpy, request by request. `every`: the same requests ranked
    over the whole catalog with nothing excluded (each ad's retrieval score, pctr, pcvr, score)."""
    row_of = {a: i for i, a in enumerate(catalog)}
    out = {key: [] for key in ("ad_ids", "pctr", "pcvr", "score", "retrieval_scores")}
    for b in range(len(excluded)):
        ads = [a.decode() for a in every["ad_ids"][b]]
        values = {key: dict(zip(ads, every[key][b], strict=True)) for key in out if key != "ad_ids"}
        by_retrieval = sorted(ads, key=lambda a: (-values["retrieval_scores"][a], row_of[a]))
        dropped = set(excluded[b])
        ranked = [a for a in by_retrieval if a not in dropped][:n]
        best = sorted(ranked, key=lambda a: -values["score"][a])[:k]  # stable: retrieval order on ties
        slots = best + [PAD_AD_ID] * (k - len(best))
        out["ad_ids"].append(slots)
        for key, fill in (("pctr", 0.0), ("pcvr", 0.0), ("score", 0.0), ("retrieval_scores", -np.inf)):
            out[key].append([values[key][a] if a != PAD_AD_ID else fill for a in slots])
    return out


def test_exported_recommender_answers_what_the_reference_says(trained_tiny, exported_tiny):
    cfg, catalog = trained_tiny.config.export, trained_tiny.catalog["ad_id"].astype(str).tolist()
    servable = Servable("recommender", 1, exported_tiny.paths["recommender"])
    features = as_numpy_features(trained_tiny.split.test.iloc[:5], query_inputs(
        trained_tiny.schema, trained_tiny.config.retrieval.history_length), trained_tiny.schema)
    width = len(catalog) + 60
    lists = [catalog[::2] + catalog[:30] + ["nope", "ad99999"] * 15,  # 100 distinct, duplicated, unknown ids
             catalog[5:15] + ["x"],  # a few; padded below
             [],  # nothing: only pads
             catalog[::-1],  # every ad: no ad left, all sentinels
             catalog[:len(catalog) - 3]]  # three ads left: fewer than k
    excluded = np.array([ids + [PAD_AD_ID] * (width - len(ids)) for ids in lists], dtype=object)
    try:
        got = servable.run({**features, EXCLUDED_AD_IDS: excluded})
        whole = RecommenderServable(trained_tiny, len(catalog), len(catalog), cfg.objective)
        every = {key: value.numpy() for key, value in whole.serve(
            {**features, EXCLUDED_AD_IDS: tf.fill([5, 0], "")}).items()}
        want = _reference(every, excluded, catalog, min(cfg.retrieve_n, len(catalog)), cfg.recommend_k)
        assert [[a.decode() for a in row] for row in got["ad_ids"]] == want["ad_ids"]
        for key in ("pctr", "pcvr", "score", "retrieval_scores"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        assert want["ad_ids"][3] == [PAD_AD_ID] * cfg.recommend_k and want["ad_ids"][4][3:] == [PAD_AD_ID] * 7
        alone = servable.run({**{key: v[1:2] for key, v in features.items()}, EXCLUDED_AD_IDS: excluded[1:2, :11]})
        assert alone["ad_ids"][0].tolist() == got["ad_ids"][1].tolist()  # its batch and padding change nothing
    finally:
        servable.close()


def test_a_catalog_with_a_repeated_ad_id_is_not_exported(trained_tiny):
    catalog = trained_tiny.catalog.copy()
    catalog.loc[1, "ad_id"] = catalog.loc[0, "ad_id"]
    with pytest.raises(ExportError, match="^recommender: the catalog lists an ad id twice"):
        RecommenderServable(dataclasses.replace(trained_tiny, catalog=catalog), 10, 5)
