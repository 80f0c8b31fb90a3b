"""The thin client without TensorFlow: a virtual environment of its own, and the wire format.

`thin_venv` builds this checkout and installs it with the `client` extra into a fresh venv (it
needs PyPI, like `make setup`: pip fetches grpcio, protobuf, numpy and the build's grpcio-tools);
a script run there imports `serving.client`, finds no TensorFlow and asks an embedded server
started here for recommendations. The messages the build compiled from serving/protos/ are
checked against TF Serving's installed ones, field for field.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2  # noqa: F401  (registers health.proto in the default pool)
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2  # noqa: F401

from serving import wire
from serving.client import RecommendationClient
from serving.server import EmbeddedModelServer, discover_models

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "features", "trainer", "serving")
PIP_TIMEOUT = 600
USER = {"user_id": "u00001", "age_bucket": "25-34", "gender": "f", "region": "r1"}
CONTEXT = {"device": "mobile", "placement": "feed", "hour": 20, "weekday": 4}

CHECK = """
import importlib.util, json, sys
missing = [m for m in ("tensorflow", "tensorflow_serving", "tensorflow_text", "pandas", "grpc_health")
           if importlib.util.find_spec(m) is not None]
assert not missing, f"installed in the thin venv: {missing}"
import serving.client
import serving._proto.descriptor_set as compiled
from serving.client import RecommendationClient
address, user, context = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
with RecommendationClient(address, timeout=30) as client:
    out = {"health": client.health(), "status": client.model_status(), "inputs": client.signature_inputs(),
           "ads": [[a.ad_id, a.score, a.scores] for a in client.recommend(user, context, k=5)]}
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_serving", "pandas"))
print(json.dumps({**out, "client": serving.client.__file__, "compiled": compiled.__file__, "heavy": heavy}))
"""


def _run(cmd, timeout, env=None, cwd=None, what=""):
    try:
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=cwd)
    except subprocess.TimeoutExpired as err:  # subprocess.run has killed it
        pytest.fail(f"{what} took over {timeout}s: {' '.join(map(str, cmd))}\n{(err.stdout or '')[-3000:]}")
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}): {' '.join(map(str, cmd))}\n"
                    f"{(done.stdout + done.stderr)[-4000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def thin_venv(tmp_path_factory):
    """A fresh venv with this checkout installed as `adrec[client]` (a wheel built from a copy)."""
    tmp = tmp_path_factory.mktemp("thin-client")
    src = tmp / "src"
    for name in BUILD_INPUTS:  # what a fresh checkout gives the build, without generated files
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_proto"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_CACHE_DIR=str(tmp / "pip-cache"), PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    started = time.monotonic()
    _run([sys.executable, "-m", "venv", tmp / "venv"], 120, env, what="python -m venv")
    python = tmp / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", f"{src}[client]"], PIP_TIMEOUT, env, cwd=tmp,
         what="pip install '.[client]' (needs PyPI for grpcio, protobuf, numpy and grpcio-tools)")
    print(f"thin venv built and installed in {time.monotonic() - started:.0f}s")
    return {"tmp": tmp, "src": src, "python": python, "env": env}


@pytest.fixture(scope="module")
def server(exported_tiny):
    base = exported_tiny.paths["recommender"].parent.parent
    with EmbeddedModelServer(discover_models(base), host="127.0.0.1", port=0) as srv:
        yield srv


def _check(venv, address: str) -> dict:
    script = venv["tmp"] / "check_client.py"
    script.write_text(CHECK)
    out = _run([venv["python"], "-I", script, address, json.dumps(USER), json.dumps(CONTEXT)], 120, venv["env"],
               cwd=venv["tmp"], what="the thin client script")
    return json.loads(out.strip().splitlines()[-1])


def _same_ads(thin: dict, server) -> None:
    with RecommendationClient(server.address, timeout=30) as client:  # this process: TensorFlow beside it
        expected = client.recommend(USER, CONTEXT, k=5)
    assert [a for a, _, _ in thin["ads"]] == [a.ad_id for a in expected]
    np.testing.assert_allclose([s for _, s, _ in thin["ads"]], [a.score for a in expected], rtol=1e-6)
    assert set(thin["ads"][0][2]) == {"pctr", "pcvr", "score", "retrieval_scores"}


def test_thin_client_recommends_without_tensorflow(thin_venv, server):
    thin = _check(thin_venv, server.address)
    site = thin_venv["tmp"] / "venv"
    assert Path(thin["client"]).is_relative_to(site) and Path(thin["compiled"]).is_relative_to(site)
    assert thin["heavy"] == []
    assert thin["health"] == "SERVING" and thin["status"] == {"1": "AVAILABLE"}
    assert thin["inputs"]["user_id"] == "string" and thin["inputs"]["hour"] == "int64"
    _same_ads(thin, server)


def test_the_wheels_compiled_protos_are_tf_servings(thin_venv):
    """What the wheel build compiled (runs before the editable install replaces the wheel)."""
    site = thin_venv["tmp"] / "venv" / "lib"
    compiled = next(site.glob("python3*/site-packages/serving/_proto/descriptor_set.py"))
    assert _differences(runpy.run_path(str(compiled))["FILE_DESCRIPTOR_SET"]) == []


def test_editable_install_compiles_protos_into_the_source_tree(thin_venv, server):
    src = thin_venv["src"]
    assert not (src / "serving" / "_proto").exists()  # the wheel build wrote to its build directory only
    _run([thin_venv["python"], "-m", "pip", "install", "--no-deps", "-e", src], PIP_TIMEOUT, thin_venv["env"],
         cwd=thin_venv["tmp"], what="pip install -e . (needs PyPI for the build's grpcio-tools)")
    thin = _check(thin_venv, server.address)
    assert Path(thin["client"]).is_relative_to(src) and Path(thin["compiled"]).is_relative_to(src)
    _same_ads(thin, server)


def _differences(descriptor_set: bytes) -> list[str]:
    """Files of `descriptor_set` that differ from the ones TensorFlow / TF Serving installed."""

    def normal(fd: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
        fd = descriptor_pb2.FileDescriptorProto.FromString(fd.SerializeToString())
        fd.ClearField("source_code_info")

        def default_json_names(message):  # protoc writes them, generated modules keep only explicit ones
            for field in message.field:
                parts = field.name.split("_")
                if field.json_name == parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:]):
                    field.ClearField("json_name")
            for nested in message.nested_type:
                default_json_names(nested)

        for message in fd.message_type:
            default_json_names(message)
        return fd

    compiled = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    differ = []
    for fd in compiled.file:
        if fd.name.startswith("google/protobuf/"):
            continue
        installed = descriptor_pb2.FileDescriptorProto.FromString(
            descriptor_pool.Default().FindFileByName(fd.name).serialized_pb)
        if normal(fd) != normal(installed):
            differ.append(fd.name)
    assert len(compiled.file) > 20  # the closure of predict, metadata, status and health
    return differ


def test_this_checkouts_protos_are_tf_servings():
    """What this process's client loaded (an editable install's or a checkout's own compilation)."""
    assert _differences(wire.DESCRIPTOR_SET) == []


@pytest.mark.parametrize("values, dtype", [
    ([["a", "é"], ["", "d"]], "string"), ([1, -2, 2**40], "int64"), ([[3], [4]], "int32"), ([0.5, -1.25], "float32"),
    ([1.0, 2.5], "float64"), ([True, False], "bool"), (np.array([b"x", b""], dtype=object), None),
    (np.arange(6, dtype=np.int64).reshape(2, 3), None),
])
def test_wire_tensors_read_as_tensorflows(values, dtype):
    """Client-built tensors parse with TF Serving's own messages into what TensorFlow would send, and back."""
    request = wire.PredictRequest()
    request.inputs["x"].CopyFrom(wire.make_tensor_proto(values, dtype))
    theirs = predict_pb2.PredictRequest.FromString(request.SerializeToString()).inputs["x"]
    expected = tf.make_ndarray(tf.make_tensor_proto(values, dtype=dtype and tf.as_dtype(dtype)))
    got = tf.make_ndarray(theirs)
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.tolist() == expected.tolist()
    back = wire.make_ndarray(wire.TensorProto.FromString(tf.make_tensor_proto(expected).SerializeToString()))
    assert back.dtype == expected.dtype and back.tolist() == expected.tolist()


def test_wire_reads_tensorflows_compact_forms_and_refuses_lossy_casts():
    broadcast = tf.make_tensor_proto(5.0, shape=[3])  # one value stands for all (float_val, not tensor_content)
    assert wire.make_ndarray(wire.TensorProto.FromString(broadcast.SerializeToString())).tolist() == [5.0] * 3
    empty = tf.make_tensor_proto(np.zeros((0, 4), np.int64))
    assert wire.make_ndarray(wire.TensorProto.FromString(empty.SerializeToString())).shape == (0, 4)
    for values, dtype in (([20.5], "int64"), ([2**40], "int32"), (["twenty"], "int64"), ([1], "string")):
        with pytest.raises((TypeError, ValueError)):
            wire.make_tensor_proto(values, dtype)
