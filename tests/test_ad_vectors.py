"""Creative vectors in the catalog (a Parquet list column, CSV text, or an .npz keyed by ad id): bad
vectors give their exact error under `fail` and are counted under `skip`, with the logs of a skipped
ad counted as `unknown_ad`; a malformed or oversized file is refused before its vectors are read."""

import numpy as np
import pandas as pd
import pytest

from features.loader import load_dataset
from features.spec import DataSpecError, spec_from_dict
from features.validate import DataValidationError

LOGS = ("user,ad,ts,clicked\n"
        "u1,a1,1700000000,1\n"
        "u2,a2,1700000100,0\n"
        "u3,a3,1700000200,1\n"
        "u4,a1,1700000300,0\n")
COLUMNS = {"user_id": "user", "ad_id": "ad", "timestamp": {"column": "ts", "format": "unix"},
           "labels": {"click": "clicked"}, "ad_text": ["title"]}
GOOD = {"a1": [0.1, 0.2, 0.3], "a2": [1.0, 0.0, -1.0], "a3": [0.5, 0.5, 0.5]}


def _spec(tmp_path, catalog_file: str, ad_vector: dict, policy=None):
    (tmp_path / "logs.csv").write_text(LOGS)
    raw = {"name": "t", "logs": {"files": ["logs.csv"]}, "catalog": {"files": [catalog_file]},
           "columns": {**COLUMNS, "ad_vector": ad_vector}, "policy": policy or {}}
    return spec_from_dict(raw, base_dir=tmp_path)


def _parquet(tmp_path, vectors: dict) -> str:
    frame = pd.DataFrame({"ad": list(vectors), "title": [f"ad {a}" for a in vectors],
                          "img": [None if v is None else list(v) for v in vectors.values()]})
    frame.to_parquet(tmp_path / "ads.parquet")
    return "ads.parquet"


def _npz(tmp_path, vectors: dict, name="creatives.npz", dim=3) -> str:
    np.savez(tmp_path / name, ad_id=np.array(list(vectors)), vectors=np.array(list(vectors.values()), np.float32)
             .reshape(len(vectors), dim))
    (tmp_path / "ads.csv").write_text("ad,title\n" + "".join(f"{a},ad {a}\n" for a in GOOD))
    return name


def test_a_parquet_list_column_becomes_the_schema_ad_vector(tmp_path):
    data = load_dataset(_spec(tmp_path, _parquet(tmp_path, GOOD), {"column": "img", "dim": 3}))
    assert (data.schema.ad_vector, data.schema.ad_vector_dim) == ("ad_vector", 3)
    np.testing.assert_allclose(data.schema.ad_vectors_of(data.catalog), np.array(list(GOOD.values())), rtol=1e-6)
    assert not data.report.skipped()


# Parquet rows are numbered from 1 (no header line): a1 is row 1.
@pytest.mark.parametrize("value, message", [
    ([0.1, 0.2], "ads.parquet:1: column 'img': got '2 numbers', expected 3 finite numbers [bad_vector]"),
    ([0.1, float("nan"), 0.3],
     "ads.parquet:1: column 'img': got 'NaN or inf at index 1', expected 3 finite numbers [bad_vector]"),
    ([0.1, float("inf"), 0.3],
     "ads.parquet:1: column 'img': got 'NaN or inf at index 1', expected 3 finite numbers [bad_vector]"),
    (None, "ads.parquet:1: column 'img': got 'no vector', expected 3 finite numbers [bad_vector]"),
])
def test_bad_parquet_vectors_fail_with_their_row_or_are_counted(tmp_path, value, message):
    catalog = _parquet(tmp_path, {**GOOD, "a1": value})
    with pytest.raises(DataValidationError) as err:
        load_dataset(_spec(tmp_path, catalog, {"column": "img", "dim": 3}, {"bad_vector": "fail"}))
    assert str(err.value) == message
    data = load_dataset(_spec(tmp_path, catalog, {"column": "img", "dim": 3}))  # skip: the default policy
    assert data.report.catalog.skipped == {"bad_vector": 1}
    assert data.report.logs.skipped == {"unknown_ad": 2}  # a1's two impressions
    assert list(data.catalog["ad_id"]) == ["a2", "a3"] and len(data.logs) == 2


def test_csv_vectors_are_text_of_numbers(tmp_path):
    (tmp_path / "ads.csv").write_text('ad,title,img\na1,x,"[0.1, 0.2, 0.3]"\na2,y,1 0 -1\na3,z,0.5;0.5;oops\n')
    data = load_dataset(_spec(tmp_path, "ads.csv", {"column": "img", "dim": 3}))
    np.testing.assert_allclose(data.schema.ad_vectors_of(data.catalog), [[0.1, 0.2, 0.3], [1, 0, -1]], rtol=1e-6)
    assert data.report.catalog.skipped == {"bad_vector": 1}
    assert "ads.csv:4: column 'img': got 'text that is not a list of numbers'" in data.report.format()


def test_an_npz_keyed_by_ad_id(tmp_path):
    name = _npz(tmp_path, {"a3": GOOD["a3"], "a1": GOOD["a1"], "a2": GOOD["a2"], "other": [9, 9, 9]})
    data = load_dataset(_spec(tmp_path, "ads.csv", {"file": name, "dim": 3}))
    np.testing.assert_allclose(data.schema.ad_vectors_of(data.catalog), np.array(list(GOOD.values())), rtol=1e-6)


def test_an_ad_missing_from_the_npz_or_with_nan_fails_or_is_counted(tmp_path):
    name = _npz(tmp_path, {"a1": GOOD["a1"], "a3": [0.0, float("nan"), 1.0]})
    spec = _spec(tmp_path, "ads.csv", {"file": name, "dim": 3}, {"missing_vector": "fail"})
    with pytest.raises(DataValidationError) as err:
        load_dataset(spec)
    assert str(err.value) == (f"ads.csv:3: column 'ad': got 'a2', expected an ad id with a vector in "
                              f"{tmp_path / name} [missing_vector]")
    with pytest.raises(DataValidationError) as err:
        load_dataset(_spec(tmp_path, "ads.csv", {"file": name, "dim": 3}, {"bad_vector": "fail"}))
    assert str(err.value) == (f"ads.csv:4: column 'ad': got 'row 1 of {tmp_path / name}: NaN or inf', "
                              "expected 3 finite numbers [bad_vector]")
    data = load_dataset(_spec(tmp_path, "ads.csv", {"file": name, "dim": 3}))
    assert data.report.catalog.skipped == {"missing_vector": 1, "bad_vector": 1}
    assert list(data.catalog["ad_id"]) == ["a1"] and data.report.logs.skipped == {"unknown_ad": 2}


def test_a_malformed_or_oversized_npz_is_refused_unread(tmp_path):
    wide = _npz(tmp_path, {"a1": [0.0] * 4}, "wide.npz", dim=4)
    with pytest.raises(DataValidationError, match=r"'vectors' has shape \[1, 4\]; expected \[ads, 3\]"):
        load_dataset(_spec(tmp_path, "ads.csv", {"file": wide, "dim": 3}))
    big = _npz(tmp_path, GOOD, "big.npz")
    with pytest.raises(DataValidationError, match=r"3 vectors of 3 take 36 bytes, more than .*max_bytes 35"):
        load_dataset(_spec(tmp_path, "ads.csv", {"file": big, "dim": 3, "max_bytes": 35}))
    np.savez(tmp_path / "twice.npz", ad_id=np.array(["a1", "a1"]), vectors=np.zeros((2, 3), np.float32))
    with pytest.raises(DataValidationError, match=r"ad id 'a1' has two vectors \(rows 0 and 1\)"):
        load_dataset(_spec(tmp_path, "ads.csv", {"file": "twice.npz", "dim": 3}))
    np.savez(tmp_path / "unnamed.npz", np.zeros((3, 3)))
    with pytest.raises(DataValidationError, match=r"no array 'ad_id'; expected arrays \['ad_id', 'vectors'\]"):
        load_dataset(_spec(tmp_path, "ads.csv", {"file": "unnamed.npz", "dim": 3}))


@pytest.mark.parametrize("ad_vector, message", [
    ({"column": "img", "file": "x.npz", "dim": 3}, "give exactly one of `column`"),
    ({"column": "img"}, r"ad_vector.dim: expected the vectors' length, 1..8192, got 0"),
    ({"file": "x.npy", "dim": 3}, "expected an .npz file"),
])
def test_the_spec_section_is_checked(tmp_path, ad_vector, message):
    with pytest.raises(DataSpecError, match=message):
        _spec(tmp_path, "ads.csv", ad_vector)
