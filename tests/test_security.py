"""Security: loopback by default, no unsafe deserialization in the source, and a fuzzed Predict
path that answers only defined status codes.

Covered elsewhere (not repeated): TLS with a self-signed test certificate, refusing plaintext and
untrusted-certificate clients (tests/test_serving.py::test_tls_server_and_client); a YAML config
or data spec carrying a `!!python/object` tag is refused and runs nothing
(tests/test_bad_inputs.py, cases `config-python-tag` and `spec-python-tag`); requests over the
message limit get RESOURCE_EXHAUSTED (tests/test_bad_inputs.py, `req-over-message-limit`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving.server import EmbeddedModelServer, discover_models, parse_args
from tests.conftest import ROOT
from trainer.config import RetrievalConfig

USER = {"user_id": "u00001", "age_bucket": "25-34", "gender": "f", "region": "r1"}
CONTEXT = {"device": "mobile", "placement": "feed", "hour": 20, "weekday": 4}
AD = {"ad_id": "a1", "advertiser_id": "x", "campaign_id": "c", "category": "k", "title": "t", "description": "d"}
HISTORY = {"history": [""] * RetrievalConfig().history_length}  # [batch, N] recent ad ids, "" = none
GOOD = {"recommender": {**USER, **CONTEXT, **HISTORY}, "retrieval": {**USER, **CONTEXT, **HISTORY},
        "ranking": {**USER, **CONTEXT, **AD}}
EXCLUDED = "excluded_ad_ids"  # the recommender's [batch, M] input, added to its well-formed requests


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_server_binds_loopback_by_default(exported_tiny):
    assert parse_args(["--model-base", "x"]).host == "127.0.0.1"  # `adrec serve` and `python -m serving.server`
    base = exported_tiny.paths["recommender"].parent.parent
    server = EmbeddedModelServer(discover_models(base), port=0, warmup=False)  # no host given
    try:
        server.start()
        assert server.address.startswith("127.0.0.1:")
        # 127.0.0.1, as IPv4 or IPv4-mapped IPv6 (::ffff:127.0.0.1): never 0.0.0.0 or ::
        assert _listening_addresses(server.port) <= LOOPBACK_HEX and _listening_addresses(server.port)
    finally:
        server.stop()


# What must never be called on data a user or a client controls.
UNSAFE = {
    r"\byaml\.(load|load_all|full_load|full_load_all|unsafe_load|unsafe_load_all)\(": "yaml without safe_load",
    r"Loader\s*=\s*yaml\.(Loader|FullLoader|UnsafeLoader)": "an unsafe YAML loader",
    r"\b(c?pickle|dill|cloudpickle|marshal|shelve)\b": "pickle-like deserialization",
    r"\b(read_pickle|to_pickle)\(": "pandas pickle",
    r"allow_pickle\s*=\s*True": "numpy pickle",
    r"(?<![\w.])(eval|exec)\(": "eval/exec",
    r"safe_mode\s*=\s*False": "Keras unsafe deserialization",
    r"shell\s*=\s*True|\bos\.system\(": "a shell",
}


def test_source_has_no_unsafe_deserialization_or_eval():
    files = [p for pkg in ("features", "trainer", "serving", "benchmarks") for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 20
    hits = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            hits += [f"{path.relative_to(ROOT)}:{number}: {why}: {line.strip()}"
                     for pattern, why in UNSAFE.items() if re.search(pattern, code)]
    assert not hits, "\n".join(hits)
    yaml_calls = {m for p in files for m in re.findall(r"\byaml\.(\w+)\(", p.read_text())}
    assert yaml_calls <= {"safe_load", "safe_dump"}, yaml_calls


def test_the_source_check_catches_what_it_looks_for():
    lines = ["raw = yaml.load(text)", "import pickle", "x = eval(expr)", "yaml.load(f, Loader=yaml.Loader)",
             "subprocess.run(cmd, shell=True)", "pd.read_pickle(path)"]
    for line in lines:
        assert any(re.search(p, line) for p in UNSAFE), line
    for line in ["raw = yaml.safe_load(text)", "model.evaluate(x)", "self.eval_steps = 3", "evaluate_retrieval(m)"]:
        assert not any(re.search(p, line) for p in UNSAFE), line


# ----------------------------------------------------------------------------------------------
# Fuzzing the request validation path
# ----------------------------------------------------------------------------------------------

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
MAX_MESSAGE = 512 * 1024
DTYPES = [types_pb2.DT_STRING, types_pb2.DT_INT64, types_pb2.DT_INT32, types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE,
          types_pb2.DT_BOOL, types_pb2.DT_UINT8, types_pb2.DT_HALF, types_pb2.DT_INVALID]
FUZZ_EXAMPLES = int(os.environ.get("ADREC_FUZZ_EXAMPLES", "200"))  # a fixed seed, unless:
FUZZ_RANDOM = bool(os.environ.get("ADREC_FUZZ_RANDOM"))  # set it for a longer, random hunt
NAMES = sorted({k for features in GOOD.values() for k in features} | {EXCLUDED})


@st.composite
def tensors(draw) -> tensor_pb2.TensorProto:
    dtype = draw(st.sampled_from(DTYPES) | st.integers(0, 200))
    dims = draw(st.lists(st.integers(0, 20) | st.sampled_from([-1, 10**9, 2**40]), max_size=3))
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for d in dims:
        proto.tensor_shape.dim.add(size=d)
    how = draw(st.sampled_from(["strings", "huge_string", "ints", "floats", "content", "empty"]))
    if how == "strings":
        proto.string_val.extend(draw(st.lists(st.binary(max_size=64) | st.text(max_size=32).map(str.encode),
                                              max_size=20)))
    elif how == "huge_string":
        proto.string_val.append(b"x" * draw(st.sampled_from([100_000, MAX_MESSAGE + 1])))
    elif how == "ints":
        proto.int64_val.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20)))
    elif how == "floats":
        proto.float_val.extend(draw(st.lists(st.floats(width=32), max_size=20)))
    elif how == "content":
        proto.tensor_content = draw(st.binary(max_size=256))
    return proto


@st.composite
def requests(draw) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    rare = draw(st.integers(0, 19))  # 1 in 20: an unknown model, 1 in 20: an unknown signature
    model = draw(st.text(max_size=12)) if rare == 0 else draw(st.sampled_from(sorted(GOOD)))
    request.model_spec.name = model
    request.model_spec.signature_name = (draw(st.text(min_size=1, max_size=8)) if rare == 1
                                         else draw(st.sampled_from(["", "serving_default"])))
    if rare == 2:
        request.model_spec.version.value = draw(st.integers(0, 3))
    rows = draw(st.integers(0, 20))
    for key, value in GOOD.get(model, GOOD["recommender"]).items():  # start from a well-formed request
        dtype = tf.int64 if isinstance(value, int) else tf.string
        request.inputs[key].CopyFrom(tf.make_tensor_proto([value] * rows, dtype=dtype))
    if model == "recommender":
        request.inputs[EXCLUDED].CopyFrom(tf.make_tensor_proto(np.full((rows, 1), b"", dtype=object), tf.string))
    for _ in range(draw(st.integers(1, 3))):  # then break it
        what = draw(st.sampled_from(["replace", "drop", "add"]))
        name = draw(st.sampled_from(NAMES) | st.text(min_size=1, max_size=12))
        if what == "drop":
            request.inputs.pop(name, None)
        else:
            request.inputs[name].CopyFrom(draw(tensors()))
    return request


@pytest.fixture(scope="module")
def fuzz_target(exported_tiny):
    base = exported_tiny.paths["recommender"].parent.parent
    with EmbeddedModelServer(discover_models(base), max_batch_size=16, max_message_bytes=MAX_MESSAGE) as server, \
            grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        yield server, prediction_service_pb2_grpc.PredictionServiceStub(channel)


def test_fuzzed_predict_requests_get_only_defined_codes(fuzz_target):
    server, stub = fuzz_target
    seen: dict[str, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not FUZZ_RANDOM, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests())
    def fuzz(request):
        try:
            stub.Predict(request, timeout=30)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
        seen[code.name] = seen.get(code.name, 0) + 1
        assert code in ALLOWED, f"{code.name}: {details[:300]}"
        assert code == grpc.StatusCode.OK or details.strip(), "an error without a message"

    fuzz()
    print(f"fuzzed Predict: {sum(seen.values())} requests, codes {dict(sorted(seen.items()))}")
    assert len(seen) >= 3  # the fuzz reached past the first checks
    good = predict_pb2.PredictRequest()
    good.model_spec.name = "recommender"
    for key, value in GOOD["recommender"].items():
        good.inputs[key].CopyFrom(tf.make_tensor_proto([value], dtype=tf.int64 if isinstance(value, int) else None))
    good.inputs[EXCLUDED].CopyFrom(tf.make_tensor_proto([[""]], dtype=tf.string))
    assert stub.Predict(good, timeout=30).outputs["ad_ids"].tensor_shape.dim[0].size == 1  # still serving
