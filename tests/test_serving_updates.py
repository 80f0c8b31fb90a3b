"""Hot model updates: a new version swaps in under load with no failed request; a version
that cannot load or warm up is refused and the old one keeps serving, until its files change.
Version policies and labels follow TF Serving; directory names that are not an int64 are ignored."""

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.client import RecommendationClient
from serving.config import read_model_config
from serving.registry import ModelRegistry, NotServedError
from serving.server import EmbeddedModelServer
from serving.warmup import predict_request, write_warmup_file
from trainer.config import RetrievalConfig

USER = {"user_id": "u00001", "age_bucket": "25-34", "gender": "f", "region": "r1"}
CONTEXT = {"device": "mobile", "placement": "feed", "hour": 20, "weekday": 4}
NO_HISTORY = {"history": [[""] * RetrievalConfig().history_length]}  # raw Predicts: the user has no recent clicks
MODELS = ("retrieval", "ranking", "recommender")


@pytest.fixture()
def model_copy(export_copy) -> Path:
    """A private copy of the export (version 1 of each model plus models.config)."""
    return export_copy


def _publish(base: Path, name: str, version: int, source_version: int = 1) -> Path:
    """Stage a copy under a temporary name, then rename: how export publishes a version."""
    tmp = base / name / f".tmp-{version}"
    shutil.copytree(base / name / str(source_version), tmp)
    final = base / name / str(version)
    os.replace(tmp, final)
    return final


def _status(address, name, label=""):
    with grpc.insecure_channel(address) as channel:
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = name
        req.model_spec.version_label = label
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(req, timeout=10)
    names = get_model_status_pb2.ModelVersionStatus.State.Name
    return {s.version: (names(s.state), s.status.error_message) for s in response.model_version_status}


def _models(base: Path) -> dict[str, Path]:
    return {e.name: e.base_path for e in read_model_config(base / "models.config")}


def test_new_version_swaps_in_under_load_without_failures(model_copy):
    threads_n, max_requests, max_seconds = 4, 20000, 200.0  # bounds; the test stops them 2 s after the swap
    results: list[list[tuple[float, int | str]]] = [[] for _ in range(threads_n)]
    stop = threading.Event()
    inputs = {**{k: [v] for k, v in {**USER, **CONTEXT}.items()}, **NO_HISTORY}
    with EmbeddedModelServer(_models(model_copy), poll_seconds=0.2) as server, \
            RecommendationClient(server.address, timeout=10) as client:
        client.signature_inputs()

        def load(out):
            deadline = time.monotonic() + max_seconds
            while not stop.is_set() and len(out) < max_requests and time.monotonic() < deadline:
                try:
                    out.append((time.monotonic(), client.predict_versioned(inputs)[1]))
                except Exception as err:  # noqa: BLE001  (every failure is counted, none may happen)
                    out.append((time.monotonic(), f"{type(err).__name__}: {err}"))

        workers = [threading.Thread(target=load, args=(results[i],)) for i in range(threads_n)]
        for w in workers:
            w.start()
        time.sleep(2.0)
        for name in MODELS:
            _publish(model_copy, name, 2)
        swap_deadline = time.monotonic() + 180
        while any(s.version != 2 for s in server.registry.all().values()):
            # a loaded 2-core machine takes about a minute
            assert time.monotonic() < swap_deadline, "version 2 was not loaded within 180 s"
            time.sleep(0.05)
        swapped_at = time.monotonic()
        time.sleep(2.0)
        stop.set()
        for w in workers:
            w.join(timeout=max_seconds + 10)
        status = _status(server.address, "recommender")
    flat = [r for out in results for r in out]
    failures = [r for _, r in flat if isinstance(r, str)]
    print(f"hot swap: {len(flat)} requests on {threads_n} threads, {len(failures)} failed, "
          f"{sum(r == 1 for _, r in flat)} answered by v1, {sum(r == 2 for _, r in flat)} by v2")
    assert not failures, failures[:3]
    assert {r for _, r in flat} == {1, 2}
    after = [r for t, r in flat if t > swapped_at + 0.5]
    assert after and set(after) == {2}
    assert status == {2: ("AVAILABLE", ""), 1: ("END", "")}


def _corrupt(base: Path, name: str, version: int) -> None:
    path = _publish(base, name, version)
    (path / "saved_model.pb").write_bytes(b"this is not a SavedModel")


def _bad_warmup(base: Path, name: str, version: int) -> None:
    path = _publish(base, name, version)
    bad = {k: [v] for k, v in {**USER, **CONTEXT}.items() if k != "device"}  # misses an input
    write_warmup_file(path, [predict_request(name, bad)])


@pytest.mark.parametrize("break_version, reason", [(_corrupt, "cannot load"), (_bad_warmup, "warmup")])
def test_unloadable_version_is_refused_and_old_keeps_serving(model_copy, caplog, break_version, reason):
    with EmbeddedModelServer(_models(model_copy)) as server, \
            RecommendationClient(server.address, timeout=10) as client:
        break_version(model_copy, "recommender", 2)
        with caplog.at_level(logging.INFO, logger="adrec.serving"):
            assert server.registry.poll_once() == []
            assert server.registry.poll_once() == []  # refused once, not retried every poll
        refusals = [r for r in caplog.records if "refused version 2" in r.getMessage()]
        assert len(refusals) == 1 and reason in refusals[0].getMessage()
        assert server.registry.get("recommender").version == 1
        assert len(client.recommend(USER, CONTEXT, k=3)) == 3
        status = _status(server.address, "recommender")
        assert status[1] == ("AVAILABLE", "")
        assert status[2][0] == "END" and reason in status[2][1]
        _publish(model_copy, "recommender", 3)  # a good version after the bad one is still picked up
        assert server.registry.poll_once() == ["recommender 1->3"]
        assert client.predict_versioned({**{k: [v] for k, v in {**USER, **CONTEXT}.items()}, **NO_HISTORY})[1] == 3


@pytest.mark.parametrize("text, message", [
    ("model_config_list { config { name: 'x' base_path: '/models/x' model_platform: 'pytorch' } }",
     "only 'tensorflow' is served"),
    ("model_config_list { confg {} }", "not a ModelServerConfig text proto"),
    ("", "no model_config_list entries"),
])
def test_serve_refuses_a_bad_model_config_in_one_line(tmp_path, capsys, text, message):
    from serving.server import main

    config = tmp_path / "models.config"
    config.write_text(text)
    assert main(["--model-config-file", str(config), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _one_model_config(base: Path, extra: str, name: str = "retrieval") -> dict:
    """models.config for one model with a version policy / labels (`extra`), read as adrec serve does."""
    path = base / "labels.config"
    path.write_text(f"model_config_list {{ config {{ name: '{name}' base_path: '{base / name}' {extra} }} }}")
    return {e.name: e for e in read_model_config(path)}


def _version_by_label(stub, label: str) -> int:
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name, req.model_spec.version_label = "retrieval", label
    return stub.GetModelMetadata(req, timeout=10).model_spec.version.value


def test_version_labels_pick_their_version_and_unknown_labels_fail(model_copy):
    _publish(model_copy, "retrieval", 2)
    models = _one_model_config(model_copy, "model_version_policy { specific { versions: 1 versions: 2 } } "
                                           "version_labels { key: 'stable' value: 1 } "
                                           "version_labels { key: 'canary' value: 2 }")
    with EmbeddedModelServer(models, warmup=False) as server, grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        assert {label: _version_by_label(stub, label) for label in ("stable", "canary", "")} == \
               {"stable": 1, "canary": 2, "": 2}  # no label: the highest loaded version
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.version_label = "retrieval", "stable"
        for key, value in {**USER, **CONTEXT, **NO_HISTORY}.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(
                value if key == "history" else [value], dtype=tf.int64 if isinstance(value, int) else tf.string))
        assert stub.Predict(request, timeout=10).model_spec.version.value == 1
        request.model_spec.version_label = "beta"
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Unrecognized servable version label: 'beta' for model 'retrieval'" in err.value.details()
        assert _status(server.address, "retrieval", "canary") == {2: ("AVAILABLE", "")}
        with pytest.raises(grpc.RpcError) as err:
            _status(server.address, "retrieval", "beta")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_label_naming_an_unloaded_version_is_an_error_naming_both(model_copy):
    registry = ModelRegistry(_one_model_config(model_copy, "version_labels { key: 'stable' value: 1 }"),
                             warmup=False)  # the default policy: latest 1
    try:
        assert registry.get("retrieval", label="stable").version == 1
        _publish(model_copy, "retrieval", 2)
        assert registry.poll_once() == ["retrieval 1->2"]
        with pytest.raises(NotServedError, match=r"model 'retrieval' version label 'stable' names version 1, "
                                                 r"which is not loaded \(loaded versions: \[2\]\)"):
            registry.get("retrieval", label="stable")
        assert registry.get("retrieval").version == 2
    finally:
        registry.close()


def test_version_directories_that_are_not_an_int64_are_ignored(model_copy, caplog):
    base = model_copy / "retrieval"
    for name in ("9223372036854775808", "007", "+3", "\u0663"):  # above 2^63-1, leading zero, sign, Arabic 3
        shutil.copytree(base / "1", base / name)
    registry = ModelRegistry({"retrieval": base}, warmup=False)
    try:
        with caplog.at_level(logging.WARNING, logger="adrec.serving"):
            assert registry.poll_once() == [] and registry.poll_once() == []
        assert registry.loaded_versions("retrieval") == [1]
        ignored = sorted(r.getMessage().split(base.name + "/")[1].split(":")[0]
                         for r in caplog.records if "not a version number" in r.getMessage())
        assert ignored == sorted(["9223372036854775808", "007", "+3", "\u0663"])  # each logged once
    finally:
        registry.close()


def test_a_refused_half_copied_version_is_retried_once_complete(model_copy, caplog):
    registry = ModelRegistry({"retrieval": model_copy / "retrieval"}, warmup=False)
    try:
        data = next((_publish(model_copy, "retrieval", 2) / "variables").glob("variables.data-*"))
        whole = data.read_bytes()
        data.write_bytes(whole[: len(whole) // 2])  # caught half-way through a copy
        with caplog.at_level(logging.INFO, logger="adrec.serving"):
            assert registry.poll_once() == [] and registry.poll_once() == []
        assert len([r for r in caplog.records if "refused version 2" in r.getMessage()]) == 1
        data.write_bytes(whole)  # the copy completes in place: no directory's mtime need change
        assert registry.poll_once() == ["retrieval 1->2"]
        assert registry.version_states("retrieval")[2].state == "AVAILABLE"
    finally:
        registry.close()
