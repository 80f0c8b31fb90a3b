"""What a request may cost the embedded server: decoding fuzzed against declared and carried
values and the limits (no server), then over gRPC the deadline, the concurrency cap and its health
status, the limits in GetModelMetadata, and a short adversarial load."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from serving.config import ModelConfigError
from serving.contract import PREDICTION_SERVICE
from serving.decode import VALUE_FIELDS, BadRequest, decode_inputs
from serving.limits import DEFAULT_LIMITS, LIMITS_METADATA_FIELD, RequestLimits, limits_from_args
from serving.servable import TensorInfo
from serving.server import EmbeddedModelServer, parse_args
from trainer.config import RetrievalConfig

# A signature shaped like the recommender's: [batch] features, a fixed-width history, an open-width
# excluded_ad_ids, and a float input for the packed tensor_content path.
N = 4
SIGNATURE = {"user_id": TensorInfo("u:0", tf.string, [None]), "hour": TensorInfo("h:0", tf.int64, [None]),
             "history": TensorInfo("hi:0", tf.string, [None, N]),
             "excluded_ad_ids": TensorInfo("e:0", tf.string, [None, None]),
             "bid": TensorInfo("b:0", tf.float32, [None])}
CARRY = ["exact", "packed", "one_value", "one_short", "one_more", "content_short", "stray_field", "both"]


@st.composite
def requests(draw):
    """(inputs, the arrays they hold, how each input carries its values)."""
    rows, width = draw(st.integers(0, 6)), draw(st.integers(0, 12))
    arrays = {
        "user_id": draw(hnp.arrays(object, rows, elements=st.binary(max_size=8))),
        "hour": draw(hnp.arrays(np.int64, rows)),
        "history": draw(hnp.arrays(object, (rows, N), elements=st.binary(max_size=6))),
        "excluded_ad_ids": draw(hnp.arrays(object, (rows, width), elements=st.binary(max_size=6))),
        "bid": draw(hnp.arrays(np.float32, rows, elements=st.floats(-1e6, 1e6, width=32))),
    }
    carry = {k: draw(st.sampled_from(CARRY)) for k in arrays}
    inputs = {}
    for key, array in arrays.items():
        dtype = SIGNATURE[key].dtype
        field = VALUE_FIELDS[dtype]
        proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
        for d in array.shape:
            proto.tensor_shape.dim.add(size=d)
        flat = array.reshape(-1).tolist()
        how = carry[key]
        if how == "packed" and dtype != tf.string:
            proto.tensor_content = array.tobytes()
        elif how == "content_short" and dtype != tf.string:
            proto.tensor_content = array.tobytes()[:-1] if array.size else b"\0"
        else:
            pad = flat[:1] or [b"" if dtype == tf.string else 0]
            getattr(proto, field).extend({"one_value": flat[:1], "one_short": flat[:-1], "one_more": flat + pad}
                                         .get(how, flat))
        if how == "stray_field":
            proto.uint32_val.append(1)
        if how == "both":
            proto.tensor_content = b"\0" * 8
        inputs[key] = proto
    return inputs, arrays, carry


def _faithful(how: str, array: np.ndarray) -> bool:
    """Whether `how` carries exactly the declared values (strings have no packed form: they carry
    the exact list when asked to pack)."""
    if how in ("exact", "packed") or (how == "content_short" and array.dtype == object):
        return True
    return {"one_value": array.size <= 1, "one_short": array.size == 0}.get(how, False)


def _within(limits: RequestLimits, inputs: dict, arrays: dict) -> bool:
    """Whether a faithful request keeps every limit: rows, width, elements, and bytes (numeric values
    at their size, string inputs as sent)."""
    size = sum(inputs[k].ByteSize() if a.dtype == object else a.nbytes for k, a in arrays.items())
    return (len(arrays["hour"]) <= limits.max_batch_size
            and arrays["excluded_ad_ids"].shape[1] <= limits.max_excluded_ad_ids
            and sum(a.size for a in arrays.values()) <= limits.max_request_elements
            and size <= limits.max_request_bytes)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(requests(), st.integers(1, 8), st.integers(1, 12), st.integers(1, 200), st.integers(1, 600))
def test_decoding_refuses_what_it_would_guess_and_keeps_every_value(case, batch, width, elements, size):
    inputs, arrays, carry = case
    limits = RequestLimits(max_batch_size=batch, max_excluded_ad_ids=width, max_request_elements=elements,
                           max_request_bytes=size)
    faithful = all(_faithful(carry[k], a) for k, a in arrays.items())
    try:
        decoded = decode_inputs(inputs, SIGNATURE, limits)
    except BadRequest as err:
        message = str(err)
        assert "\n" not in message and ("input '" in message or "batch size" in message
                                        or "in all, more than the server's" in message), message
        assert not (faithful and _within(limits, inputs, arrays)), f"refused a good request: {message}"
        return
    assert faithful and _within(limits, inputs, arrays), carry  # accepted: exactly what it declared, in limits
    for key, array in arrays.items():  # and every value unchanged
        assert decoded[key].shape == array.shape and decoded[key].dtype == array.dtype
        np.testing.assert_array_equal(decoded[key], array)

def test_the_issues_request_is_refused_before_any_allocation():
    """A few hundred bytes declaring excluded_ad_ids [1, 2^24] with one string (13 GB and minutes
    before); with a width cap high enough to pass, the carried-values check refuses it."""
    rows = {"user_id": tf.make_tensor_proto([b"x"]), "hour": tf.make_tensor_proto([0], tf.int64),
            "bid": tf.make_tensor_proto([0.0], tf.float32),
            "history": tf.make_tensor_proto(np.full((1, N), b"", dtype=object))}
    for width_cap in (1000, 1 << 24):
        proto = tensor_pb2.TensorProto(dtype=tf.string.as_datatype_enum, string_val=[b"ad00001"])
        proto.tensor_shape.dim.add(size=1)
        proto.tensor_shape.dim.add(size=1 << 24)
        limits = RequestLimits(max_excluded_ad_ids=width_cap, max_request_elements=1 << 25)
        started = time.perf_counter()
        with pytest.raises(BadRequest, match="input 'excluded_ad_ids' (lists 16777216 ad ids|declares 16777216 "
                                             "values but carries 1)"):
            decode_inputs({**rows, "excluded_ad_ids": proto}, SIGNATURE, limits)
        assert time.perf_counter() - started < 0.5 and proto.ByteSize() < 100


# ----------------------------------------------------------------------------------------------
# Over gRPC, on the tiny recommender alone
# ----------------------------------------------------------------------------------------------

HISTORY_N = RetrievalConfig().history_length
USER = {"user_id": "u00001", "age_bucket": "25-34", "gender": "f", "region": "r1", "device": "mobile",
        "placement": "feed"}
LIMITS = RequestLimits(max_batch_size=8, max_excluded_ad_ids=64, max_request_elements=1024,
                       max_request_bytes=1 << 20, max_concurrent_predicts=2)


def _request(rows: int = 1, excluded: int = 1) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "recommender"
    for key, value in {**USER, "hour": 20, "weekday": 4}.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto([value] * rows, tf.int64 if isinstance(value, int)
                                                          else tf.string))
    request.inputs["history"].CopyFrom(tf.make_tensor_proto(np.full((rows, HISTORY_N), b"", object), tf.string))
    ids = np.array([[f"ad{i:05d}".encode() for i in range(excluded)]] * rows, dtype=object)
    request.inputs["excluded_ad_ids"].CopyFrom(tf.make_tensor_proto(ids.reshape(rows, excluded), tf.string))
    return request


LARGEST = dict(rows=LIMITS.max_batch_size, excluded=LIMITS.max_excluded_ad_ids)  # 8 x (64 + 20) + 8 x 8 = 736
# The default limits' costliest requests: the widest excluded_ad_ids (127 x 1000) and the most rows
# (1024 x 100), each with as many values as --max-request-elements allows.
PER_ROW = len(USER) + 2 + HISTORY_N  # the [batch] features and the history
WIDEST = dict(rows=DEFAULT_LIMITS.max_request_elements // (PER_ROW + DEFAULT_LIMITS.max_excluded_ad_ids),
              excluded=DEFAULT_LIMITS.max_excluded_ad_ids)
TALLEST = dict(rows=DEFAULT_LIMITS.max_batch_size,
               excluded=DEFAULT_LIMITS.max_request_elements // DEFAULT_LIMITS.max_batch_size - PER_ROW)


@pytest.fixture(scope="module")
def limited(exported_tiny):
    model = exported_tiny.paths["recommender"].parent
    with EmbeddedModelServer({"recommender": model}, max_workers=4, max_batch_size=LIMITS.max_batch_size,
                             limits=LIMITS) as server, grpc.insecure_channel(server.address) as channel:
        yield server, prediction_service_pb2_grpc.PredictionServiceStub(channel), \
            health_pb2_grpc.HealthStub(channel)


@pytest.fixture(scope="module")
def at_defaults(exported_tiny):
    """The tiny recommender behind a server with every default a user gets."""
    model = exported_tiny.paths["recommender"].parent
    with EmbeddedModelServer({"recommender": model}) as server, grpc.insecure_channel(server.address) as channel:
        yield server, prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _health(health_stub, service: str = PREDICTION_SERVICE) -> str:
    status = health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def test_limits_are_shown_in_metadata_and_the_largest_request_is_served(limited):
    server, stub, _ = limited
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[LIMITS_METADATA_FIELD])
    request.model_spec.name = "recommender"
    response = stub.GetModelMetadata(request, timeout=10)
    assert set(response.metadata) == {LIMITS_METADATA_FIELD}
    shown = struct_pb2.Struct()
    assert response.metadata[LIMITS_METADATA_FIELD].Unpack(shown)
    assert dict(shown) == {"max_batch_size": 8, "max_excluded_ad_ids": 64, "max_request_elements": 1024,
                           "max_request_bytes": 1 << 20, "max_concurrent_predicts": 2,
                           "max_rows_per_run": DEFAULT_LIMITS.max_rows_per_run}
    request.metadata_field[:] = ["signature_def", "nope"]
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelMetadata(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in err.value.details()
    assert stub.Predict(_request(**LARGEST), timeout=30).outputs["ad_ids"].tensor_shape.dim[0].size == 8
    with pytest.raises(grpc.RpcError) as err:  # one more ad id is over the limits
        stub.Predict(_request(rows=8, excluded=65), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class _ExpiredContext:
    """The servicer context of a call whose deadline passed while it waited for a thread. gRPC drops
    most such calls before the handler runs, so a real client cannot make one on purpose; only what
    Predict may read of it is here, and anything else it touches fails the test."""

    def time_remaining(self):
        return -0.001

    def abort(self, code, details):
        raise grpc.RpcError(code, details)

    def __getattr__(self, name):
        raise AssertionError(f"Predict touched context.{name} on a call past its deadline")


def test_a_call_past_its_deadline_starts_no_work(limited):
    server, _, _ = limited
    unknown_input = _request()
    unknown_input.inputs["nope"].CopyFrom(tf.make_tensor_proto([1]))
    for request in (_request(), unknown_input):  # not decoded either: no INVALID_ARGUMENT for the second
        with pytest.raises(grpc.RpcError) as err:
            server.predictions.Predict(request, _ExpiredContext())
        assert err.value.args == (grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before it started")
    assert server.predictions.gate.in_flight == 0


def test_overload_is_refused_at_once_and_shown_in_health(limited):
    server, stub, health_stub = limited
    gate = server.predictions.gate
    assert _health(health_stub) == _health(health_stub, "") == "SERVING"
    held = [gate.try_enter() for _ in range(gate.capacity)]  # as if two big Predicts were running
    try:
        assert all(held) and not gate.try_enter()
        assert _health(health_stub) == _health(health_stub, "") == "NOT_SERVING"
        assert _health(health_stub, "tensorflow.serving.ModelService") == "SERVING"
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(_request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum of 2" in err.value.details()
        assert time.perf_counter() - started < 1.0  # answered, not queued behind the running calls
    finally:
        for _ in held:
            gate.leave()
    assert _health(health_stub) == _health(health_stub, "") == "SERVING"
    assert stub.Predict(_request(), timeout=30).outputs["ad_ids"].tensor_shape.dim[0].size == 1


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_largest_allowed_requests_leave_others_fast_and_memory_flat(at_defaults):
    """At the default limits, one client sends the costliest requests they allow (the widest and the
    tallest, in turn) in a bounded loop; a second client's p99 over at most 300 calls stays under
    100 ms and the server's RSS (in this process) under twice its idle size."""
    server, stub = at_defaults
    small, largest = _request(), [_request(**WIDEST), _request(**TALLEST)]
    assert all(r.ByteSize() < DEFAULT_LIMITS.max_request_bytes for r in largest)
    for _ in range(5):
        stub.Predict(small, timeout=10)
    idle = peak = _rss_mb()
    stop, big_codes = threading.Event(), []

    def adversary():
        for i in range(200):  # bounded in count and by `stop`
            if stop.is_set():
                return
            try:
                stub.Predict(largest[i % 2], timeout=30)
                big_codes.append("OK")
            except grpc.RpcError as err:
                big_codes.append(err.code().name)

    thread = threading.Thread(target=adversary, daemon=True)
    thread.start()
    latencies, deadline = [], time.monotonic() + 6.0
    try:
        while len(latencies) < 300 and time.monotonic() < deadline:
            started = time.perf_counter()
            stub.Predict(small, timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
            peak = max(peak, _rss_mb())
    finally:
        stop.set()
        thread.join(timeout=60)
    p50, p99 = np.percentile(latencies, [50, 99])
    print(f"under the largest allowed requests ({len(big_codes)} sent): {len(latencies)} small calls, "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms; RSS idle {idle:.0f} MB, peak {peak:.0f} MB")
    assert len(big_codes) >= 2 and set(big_codes) == {"OK"}  # both shapes served, beside the small calls
    assert len(latencies) >= 50 and p99 < 100 and peak < 2 * idle


def test_a_large_request_runs_in_slices_and_stops_at_its_deadline(at_defaults):
    """A 1024-row request runs in slices of --max-rows-per-run rows with the same answer as one run;
    with a deadline an eighth of its run time, the server stops working on it soon after."""
    server, stub = at_defaults
    request = _request(**TALLEST)
    started = time.perf_counter()
    sliced = stub.Predict(request, timeout=60).outputs
    full = time.perf_counter() - started
    whole = server.registry.get("recommender").run({k: tf.make_ndarray(v) for k, v in request.inputs.items()})
    np.testing.assert_array_equal(tf.make_ndarray(sliced["ad_ids"]), whole["ad_ids"])
    np.testing.assert_allclose(tf.make_ndarray(sliced["score"]), whole["score"], rtol=1e-5)
    gate, started = server.predictions.gate, time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request, timeout=full / 8)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    while gate.in_flight and time.perf_counter() - started < 10 * full:
        time.sleep(0.002)
    stopped = time.perf_counter() - started
    print(f"{TALLEST}: {full * 1000:.0f} ms in full; with a deadline of {full / 8 * 1000:.0f} ms, "
          f"stopped after {stopped * 1000:.0f} ms")
    assert gate.in_flight == 0 and stopped < full / 2
    assert stub.Predict(_request(), timeout=10).outputs["ad_ids"].tensor_shape.dim[0].size == 1  # still serving


def test_the_flags_set_the_limits_and_bad_values_are_named():
    args = parse_args(["--model-base", "m", "--max-excluded-ad-ids", "5", "--max-request-elements", "700",
                       "--max-request-bytes", "9000", "--max-concurrent-predicts", "3", "--max-batch-size", "0"])
    assert limits_from_args(args) == RequestLimits(0, 5, 700, 9000, 3)
    assert limits_from_args(parse_args(["--model-base", "m"])).max_concurrent_predicts is None  # --max-workers
    with pytest.raises(ModelConfigError, match=r"^--max-excluded-ad-ids: expected an integer >= 1, got 0$"):
        limits_from_args(parse_args(["--model-base", "m", "--max-excluded-ad-ids", "0"]))
    assert limits_from_args(parse_args(["--model-base", "m", "--max-rows-per-run", "7"])).max_rows_per_run == 7
    with pytest.raises(ModelConfigError, match=r"^--max-rows-per-run: expected an integer >= 1, got 0$"):
        limits_from_args(parse_args(["--model-base", "m", "--max-rows-per-run", "0"]))
    with pytest.raises(ModelConfigError, match=r"^--max-concurrent-predicts 3 is more than --max-workers 2$"):
        EmbeddedModelServer({}, max_workers=2, limits=RequestLimits(max_concurrent_predicts=3))  # loads nothing
