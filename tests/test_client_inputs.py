"""The client's bad inputs (tests/BAD_INPUTS.md, "Client"): every value is sent exactly as given or
refused with a one-line `RequestError` naming the input, before anything is sent.

Request cases run against the embedded server with the tiny exported model (its recommender
returns export.recommend_k = 10 ads); the value rules themselves (`serving/values.py`, the wire's
numeric casts) are checked without a server.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from serving import rows, values, wire
from serving.client import RecommendationClient, RequestError
from serving.server import EmbeddedModelServer, discover_models

USER = {"user_id": "u00001", "age_bucket": "25-34", "gender": "f", "region": "r1"}
CONTEXT = {"device": "mobile", "placement": "feed", "hour": 20, "weekday": 4}
AD = "ad00001"


def _with(**changes) -> dict:
    """recommend()'s keyword arguments: USER and CONTEXT with `user.X` / `context.X` changes, k=3."""
    kwargs = {"user": dict(USER), "context": dict(CONTEXT), "k": 3}
    for key, value in changes.items():
        part, _, name = key.partition("__")
        if name:
            kwargs[part][name] = value
        else:
            kwargs[key] = value
    return kwargs


# (id, recommend() keyword arguments (model: the model name), the RequestError's message regex)
REFUSED = [
    ("client-bytes-id-not-utf8", _with(user__user_id=b"u\xff1"),
     r"^feature 'user_id' must be string: bytes b'u\\xff1' are not UTF-8"),
    ("client-history-bytes-not-utf8", _with(history=[b"ad\xff"]), r"^'history': bytes b'ad\\xff' are not UTF-8"),
    ("client-exclude-bare-string", _with(exclude=AD),
     r"^'excluded_ad_ids' must be a list of ad ids, got the single string 'ad00001'"),
    ("client-history-bare-bytes", _with(history=AD.encode()),
     r"^'history' must be a list of ad ids, got the single string b'ad00001'"),
    ("client-ad-ids-not-a-list", _with(history=7), r"^'history' must be a list of ad ids, got int 7"),
    ("client-k-negative", _with(k=-1), r"^k must be a positive integer, got -1$"),
    ("client-k-zero", _with(k=0), r"^k must be a positive integer, got 0$"),
    ("client-k-bool", _with(k=True), r"^k must be a positive integer, got True$"),
    ("client-k-float", _with(k=2.5), r"^k must be a positive integer, got 2.5$"),
    ("client-k-above-export", _with(k=11), r"^k=11 is more than the 10 ads model 'recommender' returns"),
    ("client-int-inf", _with(context__hour=math.inf), r"^feature 'hour' must be int64: inf is not a finite number$"),
    ("client-int-nan", _with(context__hour=math.nan), r"^feature 'hour' is missing \(None or NaN in rows \[0\]\)"),
    ("client-int-2-63", _with(context__hour=2**63),
     r"^feature 'hour' must be int64: 9223372036854775808 is outside the range of int64$"),
    ("client-numpy-uint64-overflow", _with(context__weekday=np.uint64(2**64 - 1)),
     r"^feature 'weekday' must be int64: np.uint64\(18446744073709551615\) is outside the range of int64$"),
    ("client-numpy-float-overflow", _with(context__hour=np.float64(1e300)),
     r"^feature 'hour' must be int64: np.float64\(1e\+300\) is outside the range of int64$"),
    ("client-int-fraction", _with(context__hour=7.5),
     r"^feature 'hour' must be int64: 7.5 is not a whole number \(it is never truncated\)$"),
    ("client-int-bool", _with(context__hour=True), r"^feature 'hour' must be int64: expected a number, got the bool"),
    ("client-int-text-not-integer", _with(context__hour="7.5"),
     r"^feature 'hour' must be int64: expected an integer, got '7.5'$"),
    ("client-string-float", _with(user__region=7.0), r"^feature 'region' must be string: expected text, got float 7.0"),
    ("client-unknown-feature", _with(user__regoin="r1"), r"^model 'recommender' has no input\(s\) \['regoin'\]"),
    ("client-feature-twice", _with(user__hour=3), r"^feature\(s\) \['hour'\] given twice"),
    ("client-exclude-to-retrieval", _with(model="retrieval", exclude=[AD]),
     r"^model 'retrieval' takes no 'excluded_ad_ids': it cannot exclude ads"),
]

# (id, recommend() keyword arguments, the keyword arguments of a request that must get the same ads)
ACCEPTED = [
    ("client-bytes-ids", _with(user__user_id=b"u00001", history=[b"ad00002"]), _with(history=["ad00002"])),
    ("client-whole-float-for-int", _with(context__hour=20.0, context__weekday=np.int32(4)), _with()),
    ("client-integer-text-for-int", _with(context__hour="020"), _with()),
    ("client-unknown-feature-ignored", _with(user__regoin="r1", ignore_unknown_features=True), _with()),
]


@pytest.fixture(scope="module")
def server(exported_tiny):
    base = exported_tiny.paths["recommender"].parent.parent
    with EmbeddedModelServer(discover_models(base), host="127.0.0.1", port=0) as srv:
        yield srv


@pytest.mark.parametrize("case_id, kwargs, pattern", REFUSED, ids=[c[0] for c in REFUSED])
def test_client_refuses_before_sending(server, case_id, kwargs, pattern):
    kwargs = dict(kwargs)
    with RecommendationClient(server.address, model_name=kwargs.pop("model", "recommender"), timeout=10) as client:
        client.signature_inputs()
        with pytest.raises(RequestError) as err:
            client.recommend(**kwargs)
        assert client.calls == 1  # the metadata only: nothing was sent
    message = str(err.value)
    assert re.search(pattern, message), message
    assert "\n" not in message


@pytest.mark.parametrize("case_id, kwargs, same", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_client_sends_exact_values(server, case_id, kwargs, same):
    with RecommendationClient(server.address, timeout=10) as client:
        got, expected = client.recommend(**kwargs), client.recommend(**same)
    assert [(a.ad_id, a.score) for a in got] == [(a.ad_id, a.score) for a in expected] and len(got) == 3


def test_k_none_is_everything_the_model_returns(server):
    with RecommendationClient(server.address, timeout=10) as client:
        assert client.max_k() == 10 and len(client.recommend(USER, CONTEXT, k=None)) == 10
    with RecommendationClient(server.address, model_name="retrieval", timeout=10) as client:
        assert client.max_k() == 50  # configs/tiny.yaml's export.top_k


def _argv(server, **changes) -> list[str]:
    features = {**USER, **CONTEXT, "region": "007", **changes}
    return ["recommend", "--address", server.address, "--user", USER["user_id"], "--timeout", "10",
            *[f"--feature={k}={v}" for k, v in features.items() if k != "user_id"]]


# (id, what `adrec recommend` gets besides _argv's, its one error line after "adrec recommend: error: ")
CLI_REFUSED = [
    ("cli-int-feature-fraction", {"hour": "7.5"}, [], "feature 'hour' must be int64: expected an integer, got '7.5'"),
    ("cli-int-feature-not-a-number", {"hour": "x"}, [], "feature 'hour' must be int64: expected an integer, got 'x'"),
    ("cli-feature-twice", {}, ["--feature", "hour=3"], "--feature hour is given twice"),
    ("cli-k-zero", {}, ["-k", "0"], "k must be a positive integer, got 0"),
]


def test_cli_leading_zeros(server, capsys):
    """`--feature region=007` stays "007" for a string input and is 7 for an int64 one."""
    from trainer.cli import _parse_features, main

    with RecommendationClient(server.address, timeout=10) as client:
        pairs = [a.removeprefix("--feature=") for a in _argv(server, hour="007") if a.startswith("--feature=")]
        features = _parse_features(pairs, "u1")
        sent = rows.predict_inputs([features], client.signature_inputs(), {})
    assert sent["region"].tolist() == [b"007"] and sent["hour"].tolist() == [7] and sent["hour"].dtype == np.int64
    assert main([*_argv(server), "-k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # a header and 2 ads


@pytest.mark.parametrize("case_id, changes, extra, message", CLI_REFUSED, ids=[c[0] for c in CLI_REFUSED])
def test_cli_refuses_in_one_line(server, capsys, case_id, changes, extra, message):
    from trainer.cli import main

    assert main([*_argv(server, **changes), *extra]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"adrec recommend: error: {message}"]


@pytest.mark.parametrize("value, dtype, pattern", [
    (math.inf, "float32", r"inf is not a finite float32 number"),
    (math.nan, "float64", r"nan is not a finite float64 number"),
    (1e300, "float32", r"1e\+300 is not a finite float32 number"),
    (10**400, "float64", r"1000.*\(401 characters\) is not a finite float64 number"),
    ("1e999", "float32", r"'1e999' is not a finite float32 number"),
    ("nan", "float32", r"expected a decimal number, got 'nan'"),
    (b"\xff", "string", r"bytes b'\\xff' are not UTF-8"),
    ("\ud800", "string", r"'\\ud800' cannot be encoded as UTF-8 \(surrogates not allowed\)"),
    (True, "string", r"expected text, got bool True"),
    (1, "bool", r"expected a bool, got int 1"),
    (2**31, "int32", r"2147483648 is outside the range of int32"),
], ids=lambda v: values.shown(v)[:20])
def test_value_rules_refuse(value, dtype, pattern):
    with pytest.raises(RequestError, match=rf"^feature 'x' must be {dtype}: {pattern}"):
        values.column("x", [value], wire.numpy_dtype(dtype))


def test_value_rules_keep_values():
    floats = values.column("x", [3, np.int8(-2), "1.5e2", 0.25], np.dtype(np.float32))
    assert floats.dtype == np.float32 and floats.tolist() == [3.0, -2.0, 150.0, 0.25]
    with pytest.raises(RequestError, match=r"expected an integer, got ' 7' \(row 0\)$"):
        values.column("x", [" 7", 7], np.dtype(np.int64))
    assert values.column("x", ["007", b"caf\xc3\xa9", 12, np.str_("a")], np.dtype(object)).tolist() == \
        [b"007", "café".encode(), b"12", b"a"]
    assert values.ad_ids(["a", None, "", b"b", 3], "history") == ["a", "b", "3"]  # None and "" are padding
    assert values.ad_ids(math.nan, "history") == [] and values.ad_ids(np.array(["a", "b"]), "history") == ["a", "b"]
    assert values.shown("x" * 1000).endswith("... (1002 characters)")


@pytest.mark.parametrize("given, dtype, pattern", [
    ([1.0, math.nan], "float32", "not finite"),
    ([1e300], "float32", "beyond the range of float32"),
    (np.array([2.0**63]), "int64", "outside the range of int64"),
    ([2**64], "int64", "outside the range of int64"),
    (np.array([7.5], dtype=object), "int64", "not a whole number"),
    ([True], "int64", "bool values cannot be sent as int64"),
])
def test_wire_refuses_lossy_or_non_finite_numbers(given, dtype, pattern):
    with pytest.raises(ValueError, match=pattern):
        wire.make_tensor_proto(given, dtype)


@pytest.mark.parametrize("timeout", [0, -1, math.inf, math.nan, True, "10"])
def test_client_refuses_a_deadline_it_cannot_keep(timeout):
    with pytest.raises(ValueError, match="timeout must be a positive, finite number of seconds"):
        RecommendationClient("127.0.0.1:1", timeout=timeout)
