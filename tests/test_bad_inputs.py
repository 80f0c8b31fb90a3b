"""The bad-input catalog (tests/BAD_INPUTS.md lists the same case ids): every bad data file, config
and request gets a clear, named error or a defined handling, and no request takes the server down.

Cases already covered elsewhere are referenced, not repeated: the exact message and skip count of
each validation problem (tests/test_data_validation.py), config unknown keys / wrong types
(tests/test_training.py::test_config_errors_are_named_and_precise), bad requests and the message
size limit (tests/test_serving.py::test_bad_requests_get_the_right_status).
"""

from __future__ import annotations

import dataclasses
import random
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from features.loader import load_dataset
from features.readers import DataReadError
from features.spec import DataSpecError, load_spec
from features.validate import DataValidationError
from serving.client import RecommendationClient, RequestError
from serving.limits import RequestLimits
from serving.server import EmbeddedModelServer, discover_models
from serving.server import main as serve_main
from tests.conftest import make_self_signed_cert
from tests.test_data_validation import CATALOG, COLUMNS, LOGS, USERS, _spec, _users_spec
from trainer.config import ConfigError, RetrievalConfig, load_config

USER = {"user_id": "u00001", "age_bucket": "25-34", "gender": "f", "region": "r1"}
CONTEXT = {"device": "mobile", "placement": "feed", "hour": 20, "weekday": 4}
AD = {"ad_id": "a1", "advertiser_id": "x", "campaign_id": "c", "category": "k", "title": "t", "description": "d"}


# ----------------------------------------------------------------------------------------------
# Data files: (id, logs text or bytes, catalog text or bytes, expected)
# expected: an exception type and a message regex, or the rows kept and skipped (by reason)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataCase:
    id: str
    logs: str | bytes = LOGS
    catalog: str | bytes = CATALOG
    error: tuple[type, str] | None = None
    kept: int | None = None  # log rows kept
    skipped: dict | None = None  # log rows skipped, by reason
    catalog_skipped: dict | None = None
    users: tuple[str, ...] | None = None  # the user ids the loaded logs must hold, verbatim
    title_len: int | None = None  # the length of the first catalog title once loaded
    users_table: str | None = None  # a users table (tests/test_data_validation.py's USERS spec) when given
    users_skipped: dict | None = None  # users table rows skipped, by reason
    spec_extra: dict | None = None  # top-level spec keys replaced (tests/test_data_validation.py's _spec)
    files: dict | None = None  # table -> its spec's `files`, replacing logs.csv / catalog.csv


_EXTRA_FIRST = LOGS.replace("u1,a1,1700000000,1,1", "u1,a1,1700000000,1,1,zz,yy")
_EXTRA_LATER = LOGS.replace("u3,a3,1700000200,1,1", "u3,a3,1700000200,1,1,zz,yy")


def _ts_format(fmt: str) -> dict:
    return {"columns": {**COLUMNS, "timestamp": {"column": "ts", "format": fmt}}}


def _timestamps(*values: str) -> str:
    """LOGS with its four timestamps replaced, in order."""
    out = LOGS
    for old, new in zip(("1700000000", "1700000100", "1700000200", "1700000300"), values, strict=True):
        out = out.replace(old, new)
    return out


_ISO = ("2023-11-14T22:13:20Z", "2023-11-14T22:15:00Z", "2023-11-14T22:16:40Z", "2023-11-14T22:18:20Z")

DATA_CASES = [
    DataCase("data-empty-file", logs="", error=(DataReadError, r"logs.csv: the file is empty")),
    DataCase("data-header-only", logs="user,ad,ts,clicked,slot\n",
             error=(DataValidationError, r"logs: the file\(s\) .* hold no data rows")),
    DataCase("data-wrong-delimiter", logs=LOGS.replace(",", ";"),
             error=(DataValidationError, r"logs.csv:1: missing column\(s\) 'user' \(user_id\).*"
                                         r"found columns \['user;ad;ts;clicked;slot'\] \[missing_column\]")),
    DataCase("data-binary-garbage", logs=random.Random(9).randbytes(4096),
             error=(DataReadError, r"logs.csv: cannot parse as ','-separated text \(utf-8\)")),
    DataCase("data-nul-bytes", logs=b"user,ad,ts,clicked,slot\n\x00\x00\xff\x00,\x00\n",
             error=(DataReadError, r"logs.csv: cannot parse as ','-separated text \(utf-8\)")),
    DataCase("data-non-utf8-text", catalog=CATALOG.replace("Red shoes", "Caf\xe9 shoes").encode("latin-1"),
             error=(DataReadError, r"catalog.csv: cannot parse .*utf-8.* can't decode byte 0xe9")),
    DataCase("data-unbalanced-quote", logs=LOGS.replace("u2,", '"u2,'),
             error=(DataReadError, r"logs.csv: cannot parse .*EOF inside string")),
    DataCase("data-first-row-extra-fields", logs=_EXTRA_FIRST,
             error=(DataReadError, r"logs.csv: the first data row has 7 fields, the header 5")),
    DataCase("data-later-row-extra-fields", logs=_EXTRA_LATER,
             error=(DataReadError, r"logs.csv: cannot parse .*Expected 5 fields in line 4, saw 7")),
    DataCase("data-huge-text-field", catalog=CATALOG.replace("Red shoes", "shoe " * 400_000),
             kept=4, skipped={}, catalog_skipped={}, title_len=2_000_000),
    DataCase("data-nan-numeric", catalog=CATALOG.replace("0.5", "nan"),
             kept=2, skipped={"unknown_ad": 2}, catalog_skipped={"bad_type": 1}),
    DataCase("data-inf-numeric", catalog=CATALOG.replace("0.5", "inf"),
             kept=2, skipped={"unknown_ad": 2}, catalog_skipped={"bad_type": 1}),
    DataCase("data-inf-label", logs=LOGS.replace("1700000000,1", "1700000000,inf"),
             kept=3, skipped={"bad_type": 1}, catalog_skipped={}),
    DataCase("data-negative-timestamp", logs=LOGS.replace("1700000000", "-1700000000"),
             kept=3, skipped={"bad_timestamp": 1}, catalog_skipped={}),
    DataCase("data-ids-with-separators", logs=LOGS.replace("u1,", '"u,1",').replace("u2,", '"u\t2;|",'),
             kept=4, skipped={}, catalog_skipped={}, users=("u,1", "u\t2;|", "u3", "u4")),
    DataCase("data-ids-with-emoji", logs=LOGS.replace("u1,", "u😀1,").replace(",a2,", ",a🎯2,"),
             catalog=CATALOG.replace("a2,", "a🎯2,"),
             kept=4, skipped={}, catalog_skipped={}, users=("u😀1", "u2", "u3", "u4")),
    DataCase("data-crlf-and-bom", logs=("\ufeff" + LOGS.replace("\n", "\r\n")).encode("utf-8"),
             kept=4, skipped={}, catalog_skipped={}),
    DataCase("data-int64-overflow", logs=LOGS.replace("1700000000,1,1", "1700000000,1,9223372036854775808")
             .replace("1700000100,0,2", "1700000100,0,-9223372036854775809"),
             kept=2, skipped={"bad_type": 2}, catalog_skipped={}),
    DataCase("data-unix-after-2100", logs=LOGS.replace("1700000000", "4102444800"),
             kept=3, skipped={"bad_timestamp": 1}, catalog_skipped={}),
    DataCase("data-unix-ms-out-of-range", logs=_timestamps("1700000000000", "-1", "4102444800000", "1700000300000"),
             spec_extra=_ts_format("unix_ms"), kept=2, skipped={"bad_timestamp": 2}, catalog_skipped={}),
    DataCase("data-iso-before-1970", logs=_timestamps("1900-01-01T00:00:00Z", *_ISO[1:]),
             spec_extra=_ts_format("iso"), kept=3, skipped={"bad_timestamp": 1}, catalog_skipped={}),
    DataCase("data-iso-from-2100", logs=_timestamps(*_ISO[:3], "2100-01-01T00:00:00+00:00"),
             spec_extra=_ts_format("iso"), kept=3, skipped={"bad_timestamp": 1}, catalog_skipped={}),
    DataCase("data-strftime-out-of-range", logs=_timestamps("1899/12/31 23:00", "2023/11/14 22:15",
                                                            "2150/01/01 00:00", "2023/11/14 22:18"),
             spec_extra=_ts_format("%Y/%m/%d %H:%M"), kept=2, skipped={"bad_timestamp": 2}, catalog_skipped={}),
    DataCase("data-directory-in-files", files={"logs": ["."]},
             error=(DataSpecError, r"^logs.files\[0\]: '\.' matches '.*', which is not a file")),
    DataCase("data-missing-file", files={"catalog": ["nope.csv"]},
             error=(DataSpecError, r"^catalog.files\[0\]: no file matches 'nope.csv'")),
    DataCase("users-duplicate-id", users_table=USERS + "u2,es,60\n",
             kept=4, skipped={}, catalog_skipped={}, users_skipped={"duplicate_user_id": 1}),
    DataCase("users-missing-column", users_table=USERS.replace("country", "land"),
             error=(DataValidationError, r"users.csv:1: missing column\(s\) 'country' \(user_categoricals\); "
                                         r"found columns \['uid', 'land', 'age'\] \[missing_column\]")),
    DataCase("users-no-rows", users_table="uid,country,age\n",
             error=(DataValidationError, r"users: the file\(s\) \['users.csv'\] hold no data rows")),
]


def _write(path: Path, content: str | bytes) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("case", DATA_CASES, ids=lambda c: c.id)
def test_bad_data_file(tmp_path, case: DataCase):
    spec = _spec(tmp_path, **(case.spec_extra or {})) if case.users_table is None else \
        _users_spec(tmp_path, users=case.users_table)
    for table, files in (case.files or {}).items():
        spec = dataclasses.replace(spec, **{table: dataclasses.replace(getattr(spec, table), files=tuple(files))})
    _write(tmp_path / "logs.csv", case.logs)
    _write(tmp_path / "catalog.csv", case.catalog)
    if case.error:
        kind, pattern = case.error
        with pytest.raises(kind) as err:
            load_dataset(spec)
        assert re.search(pattern, str(err.value)), str(err.value)
        assert "\n" not in str(err.value)[:200]  # a one-line message, not a dump
        return
    data = load_dataset(spec)
    assert data.report.logs.read == 4 and data.report.logs.kept == case.kept == len(data.logs)
    assert dict(data.report.logs.skipped) == case.skipped  # nothing dropped without a count
    assert dict(data.report.catalog.skipped) == case.catalog_skipped
    assert dict(data.report.users.skipped) == (case.users_skipped or {})
    if case.users is not None:
        assert tuple(data.logs["user_id"]) == case.users
    if case.title_len is not None:
        assert len(data.catalog["title"].iloc[0]) == case.title_len


def test_parquet_values_beyond_int64_or_1970_2100(tmp_path):
    """Typed Parquet columns: a uint64 position above int64 is `bad_type`, a date-time outside
    1970..2100 `bad_timestamp`; the rest load with their exact values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = _spec(tmp_path, max_skipped_fraction=1.0)
    spec = dataclasses.replace(spec, logs=dataclasses.replace(spec.logs, files=("logs.parquet",)))
    when = pd.to_datetime(["2023-11-14 22:13:20", "1900-01-01 00:00:00", "2023-11-14 22:16:40", "2150-01-01 00:00:00"])
    pq.write_table(pa.table({"user": ["u1", "u2", "u3", "u4"], "ad": ["a1", "a2", "a3", "a1"], "ts": when,
                             "clicked": [1, 0, 1, 0],
                             "slot": pa.array([1, 2, 2**63, 3], type=pa.uint64())}), tmp_path / "logs.parquet")
    data = load_dataset(spec)
    assert dict(data.report.logs.skipped) == {"bad_timestamp": 2, "bad_type": 1}
    assert data.logs["user_id"].tolist() == ["u1"] and data.logs["timestamp"].tolist() == [1700000000]
    assert data.logs["position"].tolist() == [1]


# ----------------------------------------------------------------------------------------------
# Configs and data specs: (id, loader, file content, expected message regex)
# ----------------------------------------------------------------------------------------------

_EVIL = "!!python/object/apply:os.system ['touch {marker}']"
# A spec valid up to the key a case breaks (the files need not exist: load_spec reads no data).
_SPEC = "name: s\nlogs: {files: [l.csv]}\ncatalog: {files: [c.csv]}\ncolumns: {labels: {click: k}, ad_text: [t]}\n"

CONFIG_CASES = [
    ("config-unknown-key", load_config, "retrieval: {epochz: 3}\n", ConfigError,
     r"retrieval: unknown key\(s\) \['epochz'\]"),
    ("config-wrong-type", load_config, "ranking: {epochs: three}\n", ConfigError,
     r"ranking.epochs: expected int, got 'three'"),
    ("config-nan-for-int", load_config, "retrieval: {epochs: .nan}\n", ConfigError,
     r"retrieval.epochs: expected int, got nan"),
    ("config-bool-for-int", load_config, "retrieval: {batch_size: true}\n", ConfigError,
     r"retrieval.batch_size: expected int, got True"),
    ("config-negative-epochs", load_config, "retrieval: {epochs: -3}\n", ConfigError,
     r"retrieval.epochs: expected an integer >= 1, got -3"),
    ("config-zero-batch", load_config, "ranking: {batch_size: 0}\n", ConfigError,
     r"ranking.batch_size: expected an integer >= 1, got 0"),
    ("config-bad-fraction", load_config, "evaluation: {test_fraction: 1.5}\n", ConfigError,
     r"evaluation.test_fraction: expected a fraction in \(0, 1\), got 1.5"),
    ("config-not-a-mapping", load_config, "- 1\n- 2\n", ConfigError, r"expected a mapping, got list"),
    ("config-section-null", load_config, "retrieval:\n", ConfigError, r"retrieval: expected a mapping, got NoneType"),
    ("config-invalid-yaml", load_config, "retrieval: [unclosed\n", ConfigError, r"not valid YAML"),
    ("config-not-utf8", load_config, b"\xff\xfe\x00retrieval: {}\n", ConfigError, r"not UTF-8 text"),
    ("config-python-tag", load_config, f"retrieval: {_EVIL}\n", ConfigError,
     r"not valid YAML: could not determine a constructor for the tag .*python/object/apply:os.system"),
    ("config-missing-file", load_config, None, ConfigError, r"config file not found"),
    ("spec-python-tag", load_spec, f"name: {_EVIL}\n", DataSpecError,
     r"not valid YAML: could not determine a constructor for the tag .*python/object/apply"),
    ("spec-not-utf8", load_spec, b"name: \xff\xfe\n", DataSpecError, r"not UTF-8 text"),
    ("spec-unknown-key", load_spec, "name: x\nlogz: {}\n", DataSpecError, r"unknown key\(s\) \['logz'\]"),
    ("spec-missing-file", load_spec, None, DataSpecError, r"data spec not found"),
    # values that were accepted at load and crashed later (or changed meaning silently)
    ("config-zero-embedding-dim", load_config, "retrieval: {embedding_dim: 0}\n", ConfigError,
     r"job\.yaml\.retrieval\.embedding_dim: expected an integer >= 1, got 0$"),
    ("config-negative-units", load_config, "ranking: {deep_units: [64, -8]}\n", ConfigError,
     r"job\.yaml\.ranking\.deep_units\[1\]: expected an integer >= 1, got -8$"),
    ("config-empty-layers", load_config, "ranking: {deep_units: []}\n", ConfigError,
     r"job\.yaml\.ranking\.deep_units: expected a non-empty list of integers >= 1, got \(\)$"),
    ("config-zero-hidden-units", load_config, "retrieval: {hidden_units: -1}\n", ConfigError,
     r"job\.yaml\.retrieval\.hidden_units: expected an integer >= 1, got -1$"),
    ("config-zero-n-ads", load_config, "data: {synthetic: {n_ads: 0}}\n", ConfigError,
     r"job\.yaml\.data\.synthetic\.n_ads: expected an integer >= 1, got 0$"),
    ("config-zero-impressions", load_config, "data: {synthetic: {n_impressions: 0}}\n", ConfigError,
     r"job\.yaml\.data\.synthetic\.n_impressions: expected an integer >= 1, got 0$"),
    ("config-recommend-k-above-retrieve-n", load_config, "export: {retrieve_n: 10, recommend_k: 20}\n", ConfigError,
     r"job\.yaml\.export\.recommend_k: 20 is more than export\.retrieve_n 10"),
    ("config-duplicate-key", load_config, "retrieval:\n  epochs: 2\n  epochs: 3\n", ConfigError,
     r"job\.yaml: duplicate key 'epochs' on line 3 \(first on line 2\)"),
    ("config-duplicate-section", load_config, "ranking: {epochs: 2}\nretrieval: {}\nranking: {epochs: 3}\n",
     ConfigError, r"job\.yaml: duplicate key 'ranking' on line 3 \(first on line 1\)"),
    ("config-inf-float", load_config, "retrieval: {learning_rate: .inf}\n", ConfigError,
     r"job\.yaml\.retrieval\.learning_rate: expected a finite number, got inf$"),
    ("config-nan-float", load_config, "ranking: {embedding_l2: .nan}\n", ConfigError,
     r"job\.yaml\.ranking\.embedding_l2: expected a finite number, got nan$"),
    ("config-int-beyond-int64", load_config, "retrieval: {batch_size: 9223372036854775808}\n", ConfigError,
     r"job\.yaml\.retrieval\.batch_size: expected an integer that fits in int64"),
    ("config-unknown-choice", load_config, "training: {mixed_precision: fp8}\n", ConfigError,
     r"job\.yaml\.training\.mixed_precision: expected one of \['none', 'mixed_bfloat16', 'mixed_float16'\]"),
    ("config-bad-time-window", load_config, "data: {time_window: [0.5, 0.2]}\n", ConfigError,
     r"job\.yaml\.data\.time_window: expected \[start, end\] with 0 <= start < end <= 1"),
    ("spec-unknown-encoding", load_spec, _SPEC.replace("[l.csv]}", "[l.csv], encoding: klingon}"), DataSpecError,
     r"job\.yaml\.logs\.encoding: unknown text encoding 'klingon'"),
    ("spec-not-a-text-encoding", load_spec, _SPEC.replace("[c.csv]}", "[c.csv], encoding: base64}"),
     DataSpecError, r"job\.yaml\.catalog\.encoding: 'base64' is not a text encoding"),
    ("spec-empty-sep", load_spec, _SPEC.replace("[l.csv]}", "[l.csv], sep: ''}"), DataSpecError,
     r"job\.yaml\.logs\.sep: expected a separator of one or more characters, got ''"),
    ("spec-newline-sep", load_spec, _SPEC.replace("[c.csv]}", '[c.csv], sep: "\\n"}'), DataSpecError,
     r"job\.yaml\.catalog\.sep: a line break cannot separate fields"),
    ("spec-quote-sep", load_spec, _SPEC.replace("[l.csv]}", "[l.csv], sep: '\"'}"), DataSpecError,
     r"job\.yaml\.logs\.sep: '\"' holds the quote character"),
    ("spec-nan-guard", load_spec, _SPEC + "max_skipped_fraction: .nan\n", DataSpecError,
     r"job\.yaml\.max_skipped_fraction: expected a fraction in \[0, 1\], got nan"),
    ("spec-negative-guard", load_spec, _SPEC + "max_skipped_fraction: -0.1\n", DataSpecError,
     r"job\.yaml\.max_skipped_fraction: expected a fraction in \[0, 1\], got -0.1"),
    ("spec-guard-above-one", load_spec, _SPEC + "max_skipped_fraction: 1.5\n", DataSpecError,
     r"job\.yaml\.max_skipped_fraction: expected a fraction in \[0, 1\], got 1.5"),
    ("spec-nan-rating-threshold", load_spec,
     _SPEC.replace("{click: k}", "{rating: r, threshold: .nan}"), DataSpecError,
     r"job\.yaml\.columns\.labels\.threshold: expected a finite number, got nan"),
    ("spec-duplicate-key", load_spec, _SPEC + "name: again\n", DataSpecError,
     r"job\.yaml: duplicate key 'name' on line 5 \(first on line 1\)"),
]


@pytest.mark.parametrize("case_id, loader, content, kind, pattern", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_or_spec(tmp_path, case_id, loader, content, kind, pattern):
    marker = tmp_path / "pwned"
    path = tmp_path / "job.yaml"
    if content is not None:
        _write(path, content.replace("{marker}", str(marker)) if isinstance(content, str) else content)
    with pytest.raises(kind) as err:
        loader(path)
    assert re.search(pattern, str(err.value)), str(err.value)
    assert not marker.exists()  # no YAML tag ever runs code


def test_cli_prints_a_bad_config_in_one_line(tmp_path, capsys):
    """`adrec train` on a binary config: one line on stderr, exit 1, no traceback."""
    from trainer.cli import main

    path = tmp_path / "job.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adrec train: error: ") and "not UTF-8 text" in err[0]


# ----------------------------------------------------------------------------------------------
# Requests: (id, model, how to break the inputs, expected code or "OK", message)
# ----------------------------------------------------------------------------------------------

MAX_BATCH, MAX_MESSAGE = 16, 4 * 1024 * 1024
LIMITS = RequestLimits(max_batch_size=MAX_BATCH, max_excluded_ad_ids=64, max_request_elements=1024,
                       max_request_bytes=3 << 20)


def _tensor(values, dtype=None):
    return tf.make_tensor_proto(values, dtype=dtype)


def _inputs(features: dict, n: int = 1) -> dict:
    return {k: _tensor(np.array([v] * n, dtype=object).reshape(n, len(v)), tf.string) if isinstance(v, list)
            else _tensor([v] * n, tf.int64 if isinstance(v, int) else tf.string) for k, v in features.items()}


def _rec(features: dict = None, n: int = 1) -> dict:
    """A recommender request: the query features and an `excluded_ad_ids` [n, 1] of "" (nothing excluded)."""
    return {**_inputs(QUERY if features is None else features, n),
            "excluded_ad_ids": _tensor(np.full((n, 1), b"", dtype=object), tf.string)}


def _raw(dtype: int, dims: list[int], content: bytes = b"", **values) -> tensor_pb2.TensorProto:
    """A TensorProto as a client could write it: `values` maps value fields (`int64_val`, ...) to lists."""
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_content=content)
    for field, vals in values.items():
        getattr(proto, field).extend(vals)
    for d in dims:
        proto.tensor_shape.dim.add(size=d)
    return proto


OK = "OK"
NF, IA, RE = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
RANKING_QUERY = {**USER, **CONTEXT, **AD}
HISTORY_N = RetrievalConfig().history_length
QUERY = {**USER, **CONTEXT, "history": [""] * HISTORY_N}  # retrieval/recommender inputs
REQUEST_CASES = [
    ("req-empty-batch", "recommender", lambda: _rec(n=0), OK, "0 rows"),
    ("req-batch-over-limit", "recommender", lambda: _rec(n=MAX_BATCH + 1), IA,
     "batch size 17 exceeds the server's max batch size 16"),
    ("req-declared-huge-batch", "recommender",  # 30 bytes declaring 10**9 rows: refused before decoding
     lambda: {**_rec(), "hour": _raw(types_pb2.DT_INT64, [10**9], int64_val=[7])}, IA,
     "batch size 1000000000 exceeds the server's max batch size 16"),
    ("req-declared-huge-tensor", "recommender",
     lambda: {**_rec(), "hour": _raw(types_pb2.DT_INT64, [1, 10**12], int64_val=[7])}, IA,
     "input 'hour' has shape [1, 1000000000000], expected ['?']"),
    ("req-declared-vs-carried", "recommender",  # TF Serving would repeat the one value to fill [1, 8]
     lambda: {**_rec(), "excluded_ad_ids": _raw(types_pb2.DT_STRING, [1, 8], string_val=[b"ad00001"])}, IA,
     "input 'excluded_ad_ids' declares 8 values but carries 1 in string_val"),
    ("req-stray-value-field", "recommender",
     lambda: {**_rec(), "hour": _raw(types_pb2.DT_INT64, [1], int64_val=[20], float_val=[20.0])}, IA,
     "input 'hour' (int64) carries float_val; its values belong in int64_val or tensor_content alone"),
    ("req-string-tensor-content", "recommender",
     lambda: {**_rec(), "region": _raw(types_pb2.DT_STRING, [1], content=b"\x02r1")}, IA,
     "input 'region': a string tensor carries its values in string_val, not tensor_content"),
    ("req-excluded-too-wide", "recommender",  # the request: a few bytes declaring [1, 2^24]
     lambda: {**_rec(), "excluded_ad_ids": _raw(types_pb2.DT_STRING, [1, 1 << 24], string_val=[b"ad00001"])}, IA,
     "input 'excluded_ad_ids' lists 16777216 ad ids per request, more than the server's 64"),
    ("req-history-too-wide", "recommender",
     lambda: {**_rec(), "history": _tensor(np.full((1, HISTORY_N + 1), b"", dtype=object), tf.string)}, IA,
     f"input 'history' has shape [1, {HISTORY_N + 1}], expected ['?', {HISTORY_N}]"),
    ("req-over-budget", "recommender",  # 16 x 64 ad ids is within each limit; with the other inputs, too many
     lambda: {**_rec(n=MAX_BATCH), "excluded_ad_ids": _tensor(np.full((MAX_BATCH, 64), b"", dtype=object))}, IA,
     "elements in all, more than the server's 1024; split it"),
    ("req-over-byte-budget", "recommender", lambda: {**_rec(), "user_id": _tensor(["u" * (7 << 19)])}, IA,
     "bytes of values in all, more than the server's 3145728; split it"),
    ("req-negative-dimension", "recommender", lambda: {**_rec(), "hour": _raw(types_pb2.DT_INT64, [-1])},
     IA, "input 'hour' declares a negative dimension"),
    ("req-wrong-dtype", "recommender", lambda: {**_rec(), "hour": _tensor([20.0], tf.float32)}, IA,
     "input 'hour' has dtype float32, expected int64"),
    ("req-unknown-dtype-enum", "recommender", lambda: {**_rec(), "hour": _raw(999, [1])}, IA,
     "input 'hour' has dtype enum 999, expected int64"),
    ("req-dtype-unset", "recommender", lambda: {**_rec(), "region": _raw(types_pb2.DT_INVALID, [1])}, IA,
     "input 'region' has dtype unset, expected string"),
    ("req-malformed-tensor", "recommender",
     lambda: {**_rec(), "hour": _raw(types_pb2.DT_INT64, [1], content=b"\x01\x02\x03")}, IA,
     "input 'hour' carries 3 bytes of tensor_content; its declared shape needs 8 (1 x 8)"),
    ("req-scalar-input", "recommender", lambda: {**_rec(), "region": _tensor("r1")}, IA,
     "input 'region' has shape [], expected ['?']"),
    ("req-missing-input", "recommender", lambda: {k: v for k, v in _rec().items() if k != "device"}, IA,
     "missing input(s) ['device']"),
    ("req-excluded-not-a-matrix", "recommender", lambda: {**_rec(), "excluded_ad_ids": _tensor(["ad00001"])}, IA,
     "input 'excluded_ad_ids' has shape [1], expected ['?', '?']"),
    ("req-excluded-missing", "recommender", lambda: _inputs(QUERY), IA, "missing input(s) ['excluded_ad_ids']"),
    ("req-unknown-model", "nope", lambda: _inputs(QUERY), NF, "model 'nope' is not served"),
    ("req-1mb-user-id", "recommender", lambda: {**_rec(), "user_id": _tensor(["u" * 1_000_000])}, OK,
     "1 rows"),
    ("req-1mb-ad-text", "ranking", lambda: {**_inputs(RANKING_QUERY), "title": _tensor(["word " * 200_000])},
     OK, "1 rows"),
    ("req-over-message-limit", "recommender",
     lambda: {**_rec(), "user_id": _tensor(["u" * (MAX_MESSAGE + 1)])}, RE, "larger than max"),
    ("req-non-utf8-strings", "ranking",
     lambda: {**_inputs(RANKING_QUERY), "user_id": _tensor([b"\xff\xfe\xc3"]),
              "title": _tensor([b"caf\xe9 \xff"])}, OK, "1 rows"),
    ("req-emoji-and-separators", "ranking",
     lambda: {**_inputs(RANKING_QUERY), "ad_id": _tensor(["a,1\t😀"]), "title": _tensor(["😀🎯 | ads"])},
     OK, "1 rows"),
    ("req-unknown-user", "recommender",
     lambda: _rec({**QUERY, "user_id": "never-seen-user", "region": "atlantis"}), OK, "1 rows"),
    ("req-out-of-range-ints", "recommender",
     lambda: {**_rec(n=2), "hour": _tensor([-5, 2**63 - 1], tf.int64)}, OK, "2 rows"),
]


@pytest.fixture(scope="module")
def server(exported_tiny):
    base = exported_tiny.paths["recommender"].parent.parent
    with EmbeddedModelServer(discover_models(base), host="127.0.0.1", port=0, max_batch_size=MAX_BATCH,
                             max_message_bytes=MAX_MESSAGE, limits=LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _predict(stub, model: str, inputs: dict):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, proto in inputs.items():
        request.inputs[key].CopyFrom(proto)
    return stub.Predict(request, timeout=30)


@pytest.mark.parametrize("case_id, model, build, code, message", REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_bad_request(server, stub, case_id, model, build, code, message):
    inputs = build()
    if code == OK:
        response = _predict(stub, model, inputs)
        first = next(iter(response.outputs.values()))
        assert f"{first.tensor_shape.dim[0].size} rows" == message
    else:
        with pytest.raises(grpc.RpcError) as err:
            _predict(stub, model, inputs)
        assert err.value.code() == code, err.value.details()
        assert message in err.value.details()
    # the server is still up and answers a good request from the same version
    good = _predict(stub, "recommender", _rec())
    assert good.model_spec.version.value == 1 and good.outputs["ad_ids"].tensor_shape.dim[0].size == 1
    assert {n: s.version for n, s in server.registry.all().items()} == dict.fromkeys(server.registry.all(), 1)


def test_client_refuses_ill_typed_features_before_sending(server):
    with RecommendationClient(server.address, timeout=10) as client:
        client.signature_inputs()
        calls = client.calls
        with pytest.raises(RequestError, match=r"feature 'hour' must be int64"):
            client.recommend(USER, {**CONTEXT, "hour": "twenty"})
        with pytest.raises(RequestError, match=r"feature 'device' is missing"):
            client.recommend(USER, {**CONTEXT, "device": None})
        assert client.calls == calls  # nothing was sent


# ----------------------------------------------------------------------------------------------
# Server startup: (id, the `adrec serve` flags that break it, exit code, message on stderr)
# Each command line ends with `--lifetime 0`: should a case start serving, it stops at once.
# ----------------------------------------------------------------------------------------------

def _one_model(env, extra: str = "", base_path: str | None = None) -> list[str]:
    """--model-config-file of one model (retrieval of the tiny export) with a policy / labels."""
    base = base_path or str(env.models / "retrieval")
    env.config.write_text(f"model_config_list {{ config {{ name: 'retrieval' base_path: '{base}' {extra} }} }}")
    return ["--model-config-file", str(env.config)]


def _beyond_int64(env) -> list[str]:
    (env.tmp / "m" / "9223372036854775808").mkdir(parents=True)  # 2^63: no version of any model
    return _one_model(env, base_path=str(env.tmp / "m"))


STARTUP_CASES = [
    ("serve-port-out-of-range", lambda env: ["--port", "70000"], 2,
     "argument --port: port 70000 is outside 1..65535 (0: any free port)"),
    ("serve-port-not-a-number", lambda env: ["--port", "85OO"], 2,
     "argument --port: expected a port number, got '85OO'"),
    ("serve-port-taken", lambda env: ["--port", str(env.listener(reuseport=False))], 1,
     "cannot bind 127.0.0.1:{port}: port {port} is already in use"),
    ("serve-port-shared-reuseport", lambda env: ["--port", str(env.listener(reuseport=True))], 1,
     "cannot bind 127.0.0.1:{port}: port {port} is already in use"),
    ("serve-tls-key-mismatch", lambda env: ["--ssl-cert", str(env.cert), "--ssl-key", str(env.other_key)], 2,
     "TLS key {other_key} does not match certificate {cert}"),
    ("serve-tls-cert-unreadable", lambda env: ["--ssl-cert", str(env.tmp / "gone.pem"), "--ssl-key", str(env.key)], 2,
     "TLS certificate {tmp}/gone.pem: cannot read: No such file or directory"),
    ("serve-tls-key-not-pem", lambda env: ["--ssl-cert", str(env.cert), "--ssl-key", str(env.cert)], 2,
     "TLS key {cert}: not a PEM key"),
    ("serve-label-of-unloaded-version", lambda env: _one_model(env, "version_labels { key: 'stable' value: 7 }"), 2,
     "model 'retrieval': version label 'stable' names version 7, which is not loaded (policy latest 1 loads [1]"),
    ("serve-label-outside-specific", lambda env: _one_model(
        env, "model_version_policy { specific { versions: 1 } } version_labels { key: 'canary' value: 2 }"), 2,
     "version label 'canary' names version 2, which its policy specific [1] never loads"),
    ("serve-policy-too-many-versions", lambda env: _one_model(
        env, "model_version_policy { latest { num_versions: 1000 } }"), 2,
     "latest {num_versions: 1000} is more than the 16 versions one model may keep loaded"),
    ("serve-version-dir-beyond-int64", _beyond_int64, 1, "no version directory under {tmp}/m for model 'retrieval'"),
]


class _StartupEnv:
    def __init__(self, tmp: Path, models: Path):
        self.tmp, self.models, self.config = tmp, models, tmp / "models.config"
        self.cert, self.key = make_self_signed_cert(tmp)
        _, self.other_key = make_self_signed_cert(tmp, "another")
        self.sockets: list[socket.socket] = []
        self.port = 0

    def listener(self, reuseport: bool) -> int:
        """Hold a port as another server would (gRPC's default options set SO_REUSEPORT)."""
        sock = socket.socket()
        self.sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.port = sock.getsockname()[1]
        return self.port


@pytest.mark.parametrize("case_id, flags, code, message", STARTUP_CASES, ids=[c[0] for c in STARTUP_CASES])
def test_bad_server_startup(exported_tiny, tmp_path, capsys, case_id, flags, code, message):
    env = _StartupEnv(tmp_path, exported_tiny.paths["recommender"].parent.parent)
    try:
        argv = flags(env)
        if "--model-config-file" not in argv:
            argv += ["--model-config-file", str(env.models / "models.config")]
        if "--port" not in argv:
            argv += ["--port", "0"]  # 8500 may be taken on a shared host
        try:
            got = serve_main([*argv, "--lifetime", "0", "--no-warmup", "--file-system-poll-wait-seconds", "0"])
        except SystemExit as exit_:  # argparse
            got = exit_.code
    finally:
        for sock in env.sockets:
            sock.close()
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert got == code and len(errors) == 1, errors
    for key, value in {"port": env.port, "tmp": tmp_path, "cert": env.cert, "other_key": env.other_key}.items():
        message = message.replace(f"{{{key}}}", str(value))
    assert message in errors[0]


# Request cases that need more than one call, tested in tests/test_serving_limits.py.
CALL_CASES = {"req-past-deadline": "test_a_call_past_its_deadline_starts_no_work",
              "req-overload": "test_overload_is_refused_at_once_and_shown_in_health",
              "req-largest-allowed-under-load": "test_largest_allowed_requests_leave_others_fast_and_memory_flat",
              "req-deadline-while-running": "test_a_large_request_runs_in_slices_and_stops_at_its_deadline"}


def test_catalog_document_lists_every_case():
    from tests import test_serving_limits

    assert all(callable(getattr(test_serving_limits, name, None)) for name in CALL_CASES.values())
    text = (Path(__file__).parent / "BAD_INPUTS.md").read_text()
    from tests.test_client_inputs import ACCEPTED, CLI_REFUSED, REFUSED

    tables = (CONFIG_CASES, REQUEST_CASES, STARTUP_CASES, REFUSED, ACCEPTED, CLI_REFUSED)
    ids = [c.id for c in DATA_CASES] + [c[0] for table in tables for c in table] + [*CALL_CASES]
    missing = [i for i in ids if f"`{i}`" not in text]
    assert not missing, f"tests/BAD_INPUTS.md does not list {missing}"
