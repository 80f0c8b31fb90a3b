"""gRPC round trips through the embedded TF Serving-compatible server and the client."""

import os
import socket
import threading
import time

import grpc
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.client import RecommendationClient, RequestError, RetryPolicy
from serving.config import read_model_config
from serving.process import ServerProcess
from serving.pseudonym import pseudonym
from serving.server import EmbeddedModelServer, TlsConfig, discover_models
from tests.conftest import make_self_signed_cert
from trainer.config import RetrievalConfig

USER = {"user_id": "u00001", "age_bucket": "25-34", "gender": "f", "region": "r1"}
CONTEXT = {"device": "mobile", "placement": "feed", "hour": 20, "weekday": 4}
# USER as the client sends it: the user id as its pseudonym under the jobs' key (conftest)
SENT_USER = {**USER, "user_id": pseudonym(USER["user_id"], os.environ["ADREC_PSEUDONYM_KEY"].encode())}
HISTORY_LENGTH = RetrievalConfig().history_length  # what configs/tiny.yaml exports with
NO_HISTORY = np.full((1, HISTORY_LENGTH), b"", dtype=object)


def _arrays(features: dict) -> dict:
    return {k: np.array([v], dtype=np.int64 if isinstance(v, int) else object) for k, v in features.items()}


@pytest.fixture(scope="module")
def server(exported_tiny, trained_tiny):
    base = exported_tiny.paths["recommender"].parent.parent
    with EmbeddedModelServer(discover_models(base), host="127.0.0.1", port=0, max_batch_size=16,
                             max_message_bytes=256 * 1024) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with RecommendationClient(server.address, timeout=10) as c:
        yield c


def test_server_binds_loopback(server):
    assert server.address.startswith("127.0.0.1:")
    assert set(server.registry.all()) == {"retrieval", "ranking", "recommender"}


def test_recommend_round_trip_matches_tf1_servable(client, server, trained_tiny):
    ads = client.recommend(USER, CONTEXT, k=5)
    assert [a.rank for a in ads] == [1, 2, 3, 4, 5]
    assert all(a.ad_id in set(trained_tiny.catalog["ad_id"]) for a in ads)
    assert all(ads[i].score >= ads[i + 1].score for i in range(4))
    direct = server.registry.get("recommender").run(
        {**_arrays({**SENT_USER, **CONTEXT}), "history": NO_HISTORY, "excluded_ad_ids": np.array([[""]], dtype=object)})
    assert [a.ad_id for a in ads] == [i.decode() for i in direct["ad_ids"][0][:5]]
    np.testing.assert_allclose([a.score for a in ads], direct["score"][0][:5], rtol=1e-6)
    np.testing.assert_allclose([a.scores["pctr"] for a in ads], direct["pctr"][0][:5], rtol=1e-6)
    frame = client.recommend_df(USER, CONTEXT, k=3)
    assert list(frame["ad_id"]) == [a.ad_id for a in ads[:3]]
    assert {"rank", "ad_id", "score", "pctr", "pcvr", "retrieval_scores"} <= set(frame.columns)
    assert ((frame["pcvr"] > 0) & (frame["pcvr"] < 1)).all()


def test_excluded_ads_never_come_back_over_grpc(client):
    first = [a.ad_id for a in client.recommend(USER, CONTEXT, k=6)]
    shown = first[:3]
    again = client.recommend(USER, CONTEXT, k=6, exclude=shown)
    assert len(again) == 6 and not {a.ad_id for a in again} & set(shown)
    assert [a.ad_id for a in again if a.ad_id in first] == first[3:]  # the rest move up, in order
    batch = client.recommend_batch([(USER, CONTEXT), (USER, CONTEXT)], k=4, exclude=[shown[:1], []])
    assert shown[0] not in [a.ad_id for a in batch[0]]
    assert [a.ad_id for a in batch[1]] == first[:4]  # a request's answer does not depend on its batch
    with pytest.raises(RequestError, match="exclude has 1 lists for 2 requests"):
        client.recommend_batch([(USER, CONTEXT), (USER, CONTEXT)], k=4, exclude=[[]])


def test_recommend_with_history_pads_and_matches_tf1_servable(client, server, trained_tiny):
    """`recommend(..., history=[ad ids])`: the client pads the list with "" to the exported length
    (and cuts a longer one, keeping the most recent); a history changes what an unknown user gets."""
    catalog = trained_tiny.catalog
    topic = catalog["category"].iloc[0]
    history = catalog.loc[catalog["category"] == topic, "ad_id"].head(5).tolist()
    unknown = {**USER, "user_id": "never-seen-user"}
    ads = client.recommend(unknown, CONTEXT, k=5, history=history)
    padded = np.array([[h.encode() for h in history] + [b""] * (HISTORY_LENGTH - len(history))],
                      dtype=object)
    direct = server.registry.get("recommender").run({**_arrays({**unknown, **CONTEXT}), "history": padded,
                                                     "excluded_ad_ids": np.array([[""]], dtype=object)})
    assert [a.ad_id for a in ads] == [i.decode() for i in direct["ad_ids"][0][:5]]
    without = client.recommend(unknown, CONTEXT, k=5)
    # The history moves the query (retrieval scores); the ranker may still pick the same top 5.
    assert not np.allclose([a.scores["retrieval_scores"] for a in without],
                           [a.scores["retrieval_scores"] for a in ads])
    assert [a.ad_id for a in client.recommend(unknown, CONTEXT, k=5, history=[])] == [a.ad_id for a in without]
    long = history * HISTORY_LENGTH  # longer than the model's history: cut to its first N
    cut = client.recommend(unknown, CONTEXT, k=5, history=long)
    assert [a.ad_id for a in cut] == [a.ad_id for a in client.recommend(unknown, CONTEXT, k=5,
                                                                       history=long[:HISTORY_LENGTH])]
    # the retrieval model takes the same history; batches mix users with and without one
    results = client.recommend_batch([(unknown, CONTEXT, history), (USER, CONTEXT)], k=3)
    assert [a.ad_id for a in results[0]] == [a.ad_id for a in ads[:3]]
    with pytest.raises(RequestError, match="list of ad ids"):
        client.recommend(unknown, CONTEXT, history="ad00001")
    out = client.predict({**{k: [v] for k, v in {**unknown, **CONTEXT}.items()}, "history": padded},
                         model_name="retrieval")
    assert out["ad_ids"].shape == (1, trained_tiny.config.export.top_k)


def test_batch_and_unknown_user_still_get_ads(client):
    unknown = {**USER, "user_id": "never-seen-user", "region": "atlantis"}
    results = client.recommend_batch([(USER, CONTEXT), (unknown, CONTEXT)], k=4)
    assert [len(r) for r in results] == [4, 4]


def test_retrieval_and_ranking_models_over_grpc(client, trained_tiny):
    out = client.predict({**{k: [v] for k, v in {**USER, **CONTEXT}.items()}, "history": NO_HISTORY},
                         model_name="retrieval")
    assert out["ad_ids"].shape == out["scores"].shape == (1, trained_tiny.config.export.top_k)
    ad = trained_tiny.catalog.iloc[0]
    ranking_inputs = {**{k: [v] for k, v in {**USER, **CONTEXT}.items()},
                      **{c: [str(ad[c])] for c in ("ad_id", "advertiser_id", "campaign_id", "category",
                                                   "title", "description")}}
    out = client.predict(ranking_inputs, model_name="ranking")
    assert set(out) == {"pctr", "pcvr", "because_ad_ids", "because_weights", "group_contributions"}
    assert "position" not in client.signature_inputs("ranking")
    for key in ("pctr", "pcvr"):
        assert out[key].shape == (1,) and 0.0 < out[key][0] < 1.0


def _raw_predict(address, model="recommender", signature="", inputs=None, version: int | str | None = None):
    with grpc.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        req = predict_pb2.PredictRequest()
        req.model_spec.name = model
        req.model_spec.signature_name = signature
        if isinstance(version, str):
            req.model_spec.version_label = version
        elif version is not None:
            req.model_spec.version.value = version
        for k, v in (inputs or {}).items():
            req.inputs[k].CopyFrom(v)
        return stub.Predict(req, timeout=10)


def _good_inputs():
    return {**{k: tf.make_tensor_proto([v], dtype=tf.int64 if isinstance(v, int) else tf.string)
               for k, v in {**USER, **CONTEXT}.items()},
            "history": tf.make_tensor_proto(NO_HISTORY, dtype=tf.string),
            "excluded_ad_ids": tf.make_tensor_proto([[""]], dtype=tf.string)}


@pytest.mark.parametrize("case, code, message", [
    ("unknown_model", grpc.StatusCode.NOT_FOUND, "model 'nope' is not served"),
    ("unknown_signature", grpc.StatusCode.NOT_FOUND, "signature 'predict_x' not found"),
    ("wrong_dtype", grpc.StatusCode.INVALID_ARGUMENT, "input 'hour' has dtype float32, expected int64"),
    ("missing_input", grpc.StatusCode.INVALID_ARGUMENT, "missing input(s) ['device']"),
    ("wrong_shape", grpc.StatusCode.INVALID_ARGUMENT, "input 'region' has shape [1, 1], expected ['?']"),
    ("history_wrong_width", grpc.StatusCode.INVALID_ARGUMENT,
     f"input 'history' has shape [1, 3], expected ['?', {HISTORY_LENGTH}]"),
    ("batch_mismatch", grpc.StatusCode.INVALID_ARGUMENT, "inputs disagree on batch size"),
    ("batch_too_large", grpc.StatusCode.INVALID_ARGUMENT, "batch size 17 exceeds the server's max batch size 16"),
    ("message_too_large", grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ("version_not_loaded", grpc.StatusCode.NOT_FOUND, "model 'recommender' version 7 is not loaded"),
    ("unknown_version_label", grpc.StatusCode.INVALID_ARGUMENT,  # never served by another version
     "Unrecognized servable version label: 'stable' for model 'recommender'"),
    ("unknown_input", grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'colour'"),
])
def test_bad_requests_get_the_right_status(server, case, code, message):
    inputs = _good_inputs()
    model, signature = "recommender", ""
    if case == "unknown_model":
        model = "nope"
    elif case == "unknown_signature":
        signature = "predict_x"
    elif case == "wrong_dtype":
        inputs["hour"] = tf.make_tensor_proto([20.0], dtype=tf.float32)
    elif case == "missing_input":
        del inputs["device"]
    elif case == "history_wrong_width":
        inputs["history"] = tf.make_tensor_proto([["ad00001", "", ""]])
    elif case == "wrong_shape":
        inputs["region"] = tf.make_tensor_proto([["r1"]])
    elif case == "batch_mismatch":
        inputs["device"] = tf.make_tensor_proto(["mobile", "desktop"])
    elif case == "batch_too_large":
        inputs = {k: tf.make_tensor_proto([v] * 17, dtype=tf.int64 if isinstance(v, int) else tf.string)
                  for k, v in {**USER, **CONTEXT}.items()}
        inputs["history"] = tf.make_tensor_proto(np.repeat(NO_HISTORY, 17, axis=0), dtype=tf.string)
    elif case == "message_too_large":
        inputs["user_id"] = tf.make_tensor_proto(["u" * 300_000])
    elif case == "unknown_input":
        inputs["colour"] = tf.make_tensor_proto(["red"])
    version = {"version_not_loaded": 7, "unknown_version_label": "stable"}.get(case)
    with pytest.raises(grpc.RpcError) as err:
        _raw_predict(server.address, model, signature, inputs, version)
    assert err.value.code() == code
    assert message in err.value.details()


def test_a_second_server_on_a_taken_port_fails_at_once(server):
    """gRPC's SO_REUSEPORT would let both bind and split the traffic; the port is bound before
    any model loads, so the second server fails in milliseconds, naming the port."""
    started = time.monotonic()
    with pytest.raises(OSError, match=rf"^cannot bind 127.0.0.1:{server.port}: port {server.port} is already in use$"):
        EmbeddedModelServer(server.registry.base_paths, port=server.port)
    assert time.monotonic() - started < 5
    with RecommendationClient(server.address, timeout=10) as c:  # the first one still serves
        assert len(c.recommend(USER, CONTEXT, k=3)) == 3


def test_client_names_missing_features(client):
    with pytest.raises(RequestError, match="feature 'device' is missing") as err:
        client.recommend(USER, {k: v for k, v in CONTEXT.items() if k != "device"})
    needed = sorted({*USER, *CONTEXT})  # history and excluded_ad_ids are optional: the client pads them
    assert str(err.value).endswith(f"the model needs {needed}")


def test_model_status_and_metadata(server, client):
    with grpc.insecure_channel(server.address) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = "ranking"
        status = stub.GetModelStatus(req, timeout=10).model_version_status[0]
    assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    inputs = client.signature_inputs("ranking")
    assert inputs["title"] == tf.string and inputs["hour"] == tf.int64


def test_health_and_pandas_input(server, client):
    assert client.health() == "SERVING" and client.health("") == "SERVING"
    frame = pd.DataFrame([{**USER, **CONTEXT}, {**USER, **CONTEXT, "user_id": "u00002", "hour": 3}])
    by_frame = client.recommend_batch(frame, k=3)
    by_series = client.recommend(pd.Series(USER), pd.Series(CONTEXT), k=3)
    assert [a.ad_id for a in by_frame[0]] == [a.ad_id for a in by_series]
    with pytest.raises(RequestError, match="feature 'device' is missing"):
        client.recommend_batch(frame.assign(device=[None, "mobile"]), k=3)


def test_large_batches_are_split_under_the_server_limit(server):
    users = [({**USER, "user_id": f"u{i:05d}"}, {**CONTEXT, "hour": i % 24}) for i in range(40)]
    with RecommendationClient(server.address, max_batch_size=16) as c:  # the server refuses 17+
        batched = c.recommend_batch(users, k=3)
        assert c.calls == 1 + 3  # metadata, then 16 + 16 + 8
        singles = [[a.ad_id for a in c.recommend(u, x, k=3)] for u, x in users[::13]]
    assert len(batched) == 40 and [[a.ad_id for a in batched[i]] for i in range(0, 40, 13)] == singles


def test_tls_server_and_client(exported_tiny, tmp_path, capsys):
    from trainer.cli import main as cli_main

    cert, key = make_self_signed_cert(tmp_path)
    other_cert, _ = make_self_signed_cert(tmp_path, "not-the-server")
    base = exported_tiny.paths["recommender"].parent.parent
    fast_fail = RetryPolicy(max_attempts=1)
    with EmbeddedModelServer(read_model_config_paths(base), tls=TlsConfig(cert, key)) as srv:
        with RecommendationClient(srv.address, root_certificates=cert, timeout=10) as c:
            assert len(c.recommend(USER, CONTEXT, k=3)) == 3
        for kwargs in ({}, {"root_certificates": other_cert}):  # plaintext, or an untrusted certificate
            with RecommendationClient(srv.address, timeout=5, retry=fast_fail, **kwargs) as c:
                with pytest.raises(grpc.RpcError) as err:
                    c.recommend(USER, CONTEXT, k=3)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        argv = ["recommend", "--address", srv.address, "--root-cert", str(cert), "--user", USER["user_id"],
                "-k", "2", "--timeout", "10"]
        argv += [f"--feature={k}={v}" for k, v in {**USER, **CONTEXT}.items() if k != "user_id"]
        assert cli_main(argv) == 0
        printed = capsys.readouterr().out
        assert "pctr" in printed and "pcvr" in printed
        first = printed.splitlines()[1].split()[1]  # rank, ad_id, ...
        assert cli_main([*argv, "--exclude", first]) == 0
        assert first not in capsys.readouterr().out
        assert cli_main([*argv, "--history", first, "--history", printed.splitlines()[2].split()[1]]) == 0
        assert capsys.readouterr().out != printed  # the history moves the query embedding


def read_model_config_paths(base):
    return {e.name: e.base_path for e in read_model_config(base / "models.config")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_retries_unavailable_with_backoff_then_gives_up():
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.2)
    with RecommendationClient(f"127.0.0.1:{_free_port()}", timeout=10, retry=policy) as c:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.signature_inputs()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (c.calls, c.retries) == (1, 2) and time.monotonic() - started < 5
    # The deadline bounds the retries: a 0.3 s deadline cannot wait for 2 s backoffs.
    slow = RetryPolicy(max_attempts=10, initial_backoff=2.0, max_backoff=2.0)
    with RecommendationClient(f"127.0.0.1:{_free_port()}", timeout=0.3, retry=slow) as c:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError):
            c.signature_inputs()
        assert time.monotonic() - started < 2.0 and c.retries < 9


def test_client_rides_out_a_server_that_starts_late(exported_tiny):
    port = _free_port()
    result = {}
    policy = RetryPolicy(max_attempts=400, initial_backoff=0.1, max_backoff=0.5)

    def call():
        with RecommendationClient(f"127.0.0.1:{port}", timeout=150, retry=policy) as c:
            try:
                result["ads"] = c.recommend(USER, CONTEXT, k=3)
            finally:
                result["retries"] = c.retries

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    base = exported_tiny.paths["recommender"].parent.parent
    with EmbeddedModelServer(read_model_config_paths(base), port=port):
        caller.join(timeout=180)
    assert len(result.get("ads", [])) == 3 and result["retries"] >= 1


def test_server_process_serves_and_is_stopped_by_pid(exported_tiny):
    base = exported_tiny.paths["recommender"].parent.parent
    with ServerProcess(model_config_file=base / "models.config", lifetime=120) as proc:
        assert proc.address.startswith("127.0.0.1:")
        with RecommendationClient(proc.address) as c:
            assert len(c.recommend(USER, CONTEXT, k=3)) == 3
    assert proc.process.returncode is not None
    with pytest.raises(OSError):
        os.kill(proc.pid, 0)


@pytest.mark.skipif(not os.environ.get("ADREC_TF_SERVING_ADDR"),
                    reason="set ADREC_TF_SERVING_ADDR to a tensorflow/serving (>=2.20) serving these models")
def test_real_tensorflow_serving_round_trip():
    with RecommendationClient(os.environ["ADREC_TF_SERVING_ADDR"]) as c:
        inputs = c.signature_inputs()
        assert {"user_id", "device"} <= set(inputs)
        ads = c.recommend(USER, CONTEXT, k=5)
        assert len(ads) == 5
