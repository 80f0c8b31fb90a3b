"""SavedModel warmup requests: `assets.extra/tf_serving_warmup_requests`.

A TFRecord file of `PredictionLog` protos; TF Serving replays them (up to 1000) after
loading a version and before marking it AVAILABLE, so the first real request does not
pay for graph initialisation. The embedded server replays them the same way, and a
version whose warmup fails is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from serving.contract import SIGNATURE_KEY

WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


def warmup_path(version_dir: str | Path) -> Path:
    return Path(version_dir) / "assets.extra" / WARMUP_FILE


def predict_request(model_name: str, inputs: Mapping[str, np.ndarray],
                    signature_name: str = SIGNATURE_KEY) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    for key, values in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(values))
    return request


def write_warmup_file(version_dir: str | Path, requests: Iterable[predict_pb2.PredictRequest]) -> Path:
    path = warmup_path(version_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
            count += 1
    if not 0 < count <= MAX_WARMUP_RECORDS:
        raise ValueError(f"{path}: {count} warmup requests; TF Serving replays 1 to {MAX_WARMUP_RECORDS}")
    return path


def read_warmup_file(version_dir: str | Path) -> list[predict_pb2.PredictRequest]:
    """The Predict requests of a version's warmup file (none if it has no file)."""
    path = warmup_path(version_dir)
    if not path.exists():
        return []
    requests = []
    for i, record in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator()):
        if i >= MAX_WARMUP_RECORDS:
            break
        log = prediction_log_pb2.PredictionLog.FromString(record)
        if log.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"{path}: record {i} is a {log.WhichOneof('log_type')}, only predict_log is replayed")
        requests.append(log.predict_log.request)
    return requests
