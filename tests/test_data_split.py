"""Honest evaluation on real logs: time split, cold-start set, and nothing learned from held-out rows."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.loader import load_dataset
from features.normalize import fit_numeric_stats
from features.spec import load_spec, spec_from_dict
from features.split import cold_start_test, time_split
from features.vocab import build_vocabularies

ROOT = Path(__file__).resolve().parents[1]
ML_LATEST_SMALL = ROOT.parent / "shared" / "data" / "ml-latest-small"


def _datasets():
    out = [("mind-fixture", lambda: load_dataset(load_spec(ROOT / "configs/data/mind.yaml",
                                                           root=ROOT / "tests/fixtures/mind")))]
    if (ML_LATEST_SMALL / "ratings.csv").exists():
        out.append(("ml-latest-small", lambda: load_dataset(load_spec(ROOT / "configs/data/ml-latest-small.yaml"))))
    return out


@pytest.fixture(scope="module", params=_datasets(), ids=lambda p: p[0])
def loaded(request):
    return request.param[1]()


def test_no_evaluation_interaction_is_in_training(loaded):
    s = loaded.schema
    split = time_split(loaded.logs, 0.2, s)
    assert len(split.train) + len(split.test) == len(loaded.logs)
    assert split.train[s.timestamp].max() <= split.cutoff <= split.test[s.timestamp].min()
    assert len(split.test) == round(0.2 * len(loaded.logs))  # exactly the fraction asked for
    key = [s.user_id, s.ad_id, s.timestamp]
    both = split.train[key].merge(split.test[key], on=key, how="inner")
    assert both.empty


def test_cold_start_set_holds_only_ads_absent_from_training(loaded):
    s = loaded.schema
    split = time_split(loaded.logs, 0.2, s)
    cold = cold_start_test(split, s)
    assert len(cold) > 0
    assert not cold[s.ad_id].isin(set(split.train[s.ad_id])).any()
    warm = split.test[~split.test[s.ad_id].isin(set(cold[s.ad_id]))]
    assert warm[s.ad_id].isin(set(split.train[s.ad_id])).all()


def test_vocabularies_come_from_training_rows_only(loaded):
    s = loaded.schema
    split = time_split(loaded.logs, 0.2, s)
    vocab = build_vocabularies(split.train, loaded.catalog, s)
    assert set(vocab[s.user_id]) == set(split.train[s.user_id])
    assert set(vocab[s.ad_id]) == set(split.train[s.ad_id])
    test_only_users = set(split.test[s.user_id]) - set(split.train[s.user_id])
    assert test_only_users and not test_only_users & set(vocab[s.user_id])
    assert not set(vocab[s.ad_id]) & set(cold_start_test(split, s)[s.ad_id])
    seen_ads = loaded.catalog[loaded.catalog[s.ad_id].isin(set(split.train[s.ad_id]))]
    for name in s.ad_categoricals:
        assert set(vocab[name]) == set(seen_ads[name])
    for name in s.context_integers:
        assert set(vocab[name]) == set(split.train[name])


def test_normalisation_statistics_come_from_training_rows_only(tmp_path):
    n = 400
    rng = np.random.default_rng(1)
    # Dwell times drift upward over time, so statistics of all rows differ from training rows'.
    logs = pd.DataFrame({"user": rng.integers(0, 30, n).astype(str), "ad": rng.choice(["a1", "a2"], n),
                         "ts": 1_700_000_000 + np.arange(n) * 60, "clicked": rng.integers(0, 2, n),
                         "dwell": np.linspace(1.0, 50.0, n) + rng.normal(0, 1, n)})
    logs.to_csv(tmp_path / "logs.csv", index=False)
    (tmp_path / "catalog.csv").write_text("ad,title\na1,one\na2,two\n")
    spec = spec_from_dict({"logs": {"files": ["logs.csv"]}, "catalog": {"files": ["catalog.csv"]},
                           "columns": {"user_id": "user", "ad_id": "ad", "timestamp": "ts",
                                       "labels": {"click": "clicked"}, "ad_text": ["title"],
                                       "context_numerics": ["dwell"]}}, base_dir=tmp_path)
    data = load_dataset(spec)
    assert data.schema.extra["numerics"] == ("dwell",)
    split = time_split(data.logs, 0.25, data.schema)
    stats = fit_numeric_stats(split.train, data.schema.extra["numerics"])
    assert stats.mean["dwell"] == pytest.approx(split.train["dwell"].mean())
    assert stats.std["dwell"] == pytest.approx(split.train["dwell"].std(ddof=0))
    assert abs(stats.mean["dwell"] - data.logs["dwell"].mean()) > 3.0
    normalised = stats.apply(split.train)
    assert normalised["dwell"].mean() == pytest.approx(0.0, abs=1e-5)
    assert stats.apply(split.test)["dwell"].mean() > 1.0  # held-out rows are transformed, never fitted
