"""Streaming input: sharded log files read by tf.data, validated per chunk, vocabularies from one pass."""

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from features.loader import load_dataset
from features.schema import DEFAULT_SCHEMA as S
from features.spec import load_spec, spec_from_dict
from features.stream import StreamError, log_dataset, open_stream, shard_files
from features.synthetic import SyntheticConfig, generate_world
from features.synthetic_files import write_world
from features.validate import DataValidationError
from features.vocab import Vocabularies, build_vocabularies
from features.vocab_pass import count_pass, stream_vocabularies


@pytest.fixture(scope="module")
def world():
    return generate_world(SyntheticConfig(n_users=120, n_advertisers=10, n_ads=60, n_impressions=3000))


@pytest.fixture
def spec(world, tmp_path):
    path = write_world(world.catalog, world.logs, tmp_path, n_files=3)
    return load_spec(path, root=tmp_path)


def test_vocab_pass_equals_the_in_memory_vocabularies(spec):
    loaded = load_dataset(spec)
    stream = open_stream(spec)
    counts = count_pass(stream, loaded.schema)
    assert counts.rows == len(loaded.logs) == stream.report.logs.kept == stream.report.logs.read
    assert counts.click_rate == pytest.approx(float(loaded.logs[S.click].mean()))
    assert sorted(counts.file_rows) == sorted(str(f) for f in stream.files) and len(stream.files) == 3
    expected = build_vocabularies(loaded.logs, loaded.catalog, loaded.schema)
    assert stream_vocabularies(counts, stream.catalog, loaded.schema).values == expected.values
    # privacy.min_count: user ids by rows, user categoricals by distinct users, as in memory
    expected = build_vocabularies(loaded.logs, loaded.catalog, loaded.schema, user_min_count=30)
    counts = count_pass(open_stream(spec), loaded.schema, user_min_count=30)
    assert stream_vocabularies(counts, stream.catalog, loaded.schema, user_min_count=30).values == expected.values


def test_hashed_features_are_not_counted_and_round_trip(spec):
    stream = open_stream(spec)
    schema = spec.schema()
    counts = count_pass(stream, schema, hashed=frozenset({S.user_id}))
    assert S.user_id not in counts.values
    vocab = stream_vocabularies(counts, stream.catalog, schema, hash_buckets={S.user_id: 64})
    assert vocab[S.user_id] == [] and vocab.hashed == {S.user_id: 64}
    again = Vocabularies.from_dict(vocab.to_dict())
    assert again.values == vocab.values and again.hashed == vocab.hashed
    assert Vocabularies.from_dict({"a": [1]}).hashed == {}


def test_stream_rows_and_in_graph_catalog_join(spec):
    loaded = load_dataset(spec)
    stream = open_stream(spec)
    columns = (S.user_id, S.ad_id, "category", "advertiser_id", S.click, "hour")
    opened = []
    ds = log_dataset(stream, stream.files, columns, loaded.schema, 256, on_file=opened.append)
    parts = [{k: v.numpy() for k, v in batch.items()} for batch in ds]
    got = pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in columns})
    assert len(got) == len(loaded.logs)
    assert sorted(opened) == sorted(str(f) for f in stream.files)
    for col in (S.user_id, S.ad_id, "category", "advertiser_id"):
        got[col] = got[col].str.decode("utf-8")
    catalog = loaded.catalog.set_index(S.ad_id)
    for col in ("category", "advertiser_id"):  # joined in the graph, as the pandas merge would
        assert (got[col].to_numpy() == catalog.loc[got[S.ad_id], col].to_numpy()).all()
    key = [S.user_id, S.ad_id, "hour", S.click]
    assert got.sort_values(key).reset_index(drop=True)[key].equals(
        loaded.logs[key].sort_values(key).reset_index(drop=True).astype(got[key].dtypes.to_dict()))
    positives = log_dataset(stream, stream.files, columns, loaded.schema, 256, positives_only=True)
    assert sum(int(b[S.click].shape[0]) for b in positives) == int(loaded.logs[S.click].sum())


def _bad_shard(spec, tmp_path, policy):
    """Shard 1 with one row whose timestamp is text; returns a spec with `policy` for it."""
    path = sorted((tmp_path / "logs").glob("*.parquet"))[1]
    frame = pd.read_parquet(path)
    frame[S.timestamp] = frame[S.timestamp].astype(str)
    frame.loc[4, S.timestamp] = "yesterday"
    frame.to_parquet(path, index=False)
    return spec_from_dict({**_raw(tmp_path), "policy": {"bad_timestamp": policy}}, base_dir=tmp_path)


def _raw(tmp_path):
    import yaml
    return yaml.safe_load((tmp_path / "spec.yaml").read_text())


def test_validation_keeps_file_line_and_counts(spec, tmp_path):
    skipping = _bad_shard(spec, tmp_path, "skip")
    stream = open_stream(skipping)
    counts = count_pass(stream, skipping.schema())
    report = stream.report
    assert report.logs.skipped == {"bad_timestamp": 1} and report.logs.kept == report.logs.read - 1 == counts.rows
    example = report.examples["logs:bad_timestamp"][0]
    assert (example.file, example.line, example.value) == ("logs/part-001.parquet", 5, "yesterday")
    assert "logs/part-001.parquet:5" in report.format()
    failing = _bad_shard(spec, tmp_path, "fail")
    with pytest.raises(DataValidationError, match=r"logs/part-001\.parquet:5: column 'timestamp'"):
        count_pass(open_stream(failing), failing.schema())


def test_missing_column_in_one_shard_fails_with_its_file(spec, tmp_path):
    path = sorted((tmp_path / "logs").glob("*.parquet"))[2]
    pd.read_parquet(path).drop(columns=["device"]).to_parquet(path, index=False)
    with pytest.raises(DataValidationError, match=r"logs/part-002\.parquet:1: missing column\(s\) 'device'"):
        count_pass(open_stream(spec), spec.schema())


def test_shard_files_are_disjoint_and_cover_every_file():
    files = [f"f{i}" for i in range(5)]
    shards = [shard_files(files, i, 2) for i in range(2)]
    assert shards == [["f0", "f2", "f4"], ["f1", "f3"]]
    with pytest.raises(StreamError, match="2 log file\\(s\\) for 3 workers"):
        shard_files(files[:2], 0, 3)
    with pytest.raises(StreamError):
        shard_files(files, 2, 2)


def test_hashed_embedding_maps_every_id_into_its_buckets():
    from trainer.towers import CategoricalEmbedding

    layer = CategoricalEmbedding([], 4, False, hash_buckets=16)
    out = layer(tf.constant(["u1", "u2", "never-seen", "u1"]))
    assert out.shape == (4, 4) and layer.embedding.input_dim == 16
    np.testing.assert_array_equal(out[0], out[3])
    assert layer.get_config()["hash_buckets"] == 16
    with pytest.raises(ValueError, match="no OOV row to drop values to"):  # it would silently not drop
        CategoricalEmbedding([], 4, False, hash_buckets=16, oov_rate=0.5)


def test_csv_logs_stream_with_their_physical_lines(tmp_path):
    (tmp_path / "catalog.csv").write_text("ad,title,category\na1,Red shoes,fashion\na2,Blue hats,fashion\n")
    (tmp_path / "day1.csv").write_text("user,ad,ts,clicked\nu1,a1,1700000000,1\nu2,a2,1700000100,0\n")
    (tmp_path / "day2.csv").write_text("user,ad,ts,clicked\nu3,a9,1700000200,1\nu1,a2,1700000300,1\n")
    spec = spec_from_dict({"name": "csv", "logs": {"files": ["day*.csv"]}, "catalog": {"files": ["catalog.csv"]},
                           "columns": {"user_id": "user", "ad_id": "ad", "timestamp": "ts",
                                       "labels": {"click": "clicked"}, "ad_categoricals": ["category"],
                                       "ad_text": ["title"]}}, base_dir=tmp_path)
    stream = open_stream(spec)
    counts = count_pass(stream, spec.schema())
    assert (counts.rows, stream.report.logs.skipped) == (3, {"unknown_ad": 1})
    assert str(stream.report.examples["logs:unknown_ad"][0]).startswith("day2.csv:2: column 'ad'")
    ds = log_dataset(stream, stream.files, ("user_id", "ad_id", "category", "click"), spec.schema(), 2)
    rows = [(u.decode(), c.decode())
            for b in ds for u, c in zip(b["user_id"].numpy(), b["category"].numpy(), strict=True)]
    assert sorted(rows) == [("u1", "fashion"), ("u1", "fashion"), ("u2", "fashion")]


def test_repeating_files_without_rows_to_train_on_is_an_error_not_a_spin(spec):
    """A worker whose files hold no (clicked) rows: a repeating pipeline would read them for good."""
    stream = open_stream(spec)
    schema = spec.schema()
    stream.transform = lambda frame: frame.iloc[:0]  # every row dropped, e.g. by the forget list
    ds = log_dataset(stream, stream.files, (S.user_id, S.ad_id, S.click), schema, 16, repeat=True,
                     shuffle_buffer=64)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"log file\(s\) hold no rows to train on: part-"):
        next(iter(ds))
    once = log_dataset(stream, stream.files, (S.user_id, S.ad_id, S.click), schema, 16)
    assert list(once) == []  # read once, no rows is an empty dataset
