"""A SavedModel loaded the way TensorFlow Serving loads it: TF1 graph mode, SignatureDef tensor names."""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  (the ranking graph tokenizes with TF Text ops)
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.python.util import deprecation

from serving.contract import SIGNATURE_KEY
from serving.warmup import read_warmup_file

SERVE_TAG = "serve"


class ServableError(RuntimeError):
    """A SavedModel version cannot be loaded or a request does not fit its signature."""


@dataclass
class TensorInfo:
    name: str  # tensor name in the graph, e.g. "serving_default_user_id:0"
    dtype: tf.dtypes.DType
    shape: list[int | None] | None  # None: unknown rank


def _tensor_info(info: meta_graph_pb2.TensorInfo) -> TensorInfo:
    shape = None if info.tensor_shape.unknown_rank else [
        None if d.size < 0 else d.size for d in info.tensor_shape.dim]
    return TensorInfo(info.name, tf.dtypes.as_dtype(info.dtype), shape)


class Servable:
    """One loaded version of one model: a TF1 session and its signatures."""

    def __init__(self, name: str, version: int, path: Path):
        self.name, self.version, self.path = name, version, Path(path)
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        try:
            # The TF1 loader is deliberate (it is how tensorflow_model_server loads a model); its
            # deprecation notice would otherwise be printed on every server start.
            with self.graph.as_default(), deprecation.silence():
                self.meta_graph = tf.compat.v1.saved_model.loader.load(
                    self.session, [SERVE_TAG], str(self.path))
        except Exception as err:
            self.session.close()
            raise ServableError(f"cannot load {name} version {version} from {path}: {err}") from err
        self.signatures = {
            key: ({k: _tensor_info(v) for k, v in sig.inputs.items()},
                  {k: _tensor_info(v) for k, v in sig.outputs.items()})
            for key, sig in self.meta_graph.signature_def.items()
            if not key.startswith("__")
        }
        meta_file = self.path / "assets.extra" / "adrec.json"
        self.metadata = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        self._lock = threading.Lock()
        self._closed = False
        self._retired = False
        self._in_flight = 0

    def signature_def_map(self):
        return {k: v for k, v in self.meta_graph.signature_def.items() if not k.startswith("__")}

    def signature(self, signature_name: str = ""):
        key = signature_name or SIGNATURE_KEY
        if key not in self.signatures:
            raise KeyError(key)
        return self.signatures[key]

    def run(self, inputs: dict[str, np.ndarray], signature_name: str = "",
            output_filter: tuple[str, ...] = (), timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Feed inputs by SignatureDef name, fetch outputs by SignatureDef name. A run still going after
        `timeout_s` is cancelled (`tf.errors.DeadlineExceededError`)."""
        in_infos, out_infos = self.signature(signature_name)
        missing = sorted(set(in_infos) - set(inputs))
        extra = sorted(set(inputs) - set(in_infos))
        if missing or extra:
            raise ServableError(f"inputs do not match signature: missing {missing}, unexpected {extra}; "
                                f"expected {sorted(in_infos)}")
        wanted = output_filter or tuple(out_infos)
        unknown = sorted(set(wanted) - set(out_infos))
        if unknown:
            raise ServableError(f"unknown output(s) {unknown}; outputs are {sorted(out_infos)}")
        feed = {in_infos[k].name: v for k, v in inputs.items()}
        fetches = {k: out_infos[k].name for k in wanted}
        if self._closed:
            raise ServableError(f"{self.name} version {self.version} is unloaded")
        options = None
        if timeout_s is not None:  # 0 would mean no timeout to TensorFlow: a millisecond at least
            options = tf.compat.v1.RunOptions(timeout_in_ms=max(1, int(timeout_s * 1000)))
        return self.session.run(fetches, feed_dict=feed, options=options)

    @contextlib.contextmanager
    def in_use(self):
        """Hold the session open for one request: a retired version closes after its last request."""
        with self._lock:
            if self._closed:
                raise ServableError(f"{self.name} version {self.version} is unloaded")
            self._in_flight += 1
        try:
            yield self
        finally:
            with self._lock:
                self._in_flight -= 1
                close = self._retired and self._in_flight == 0 and not self._closed
                if close:
                    self._closed = True
            if close:
                self.session.close()

    def retire(self) -> None:
        """Unload once the requests already running on this version have finished."""
        with self._lock:
            self._retired = True
            close = self._in_flight == 0 and not self._closed
            if close:
                self._closed = True
        if close:
            self.session.close()

    def warmup(self) -> int:
        """Replay `assets.extra/tf_serving_warmup_requests` as TF Serving does; returns the count."""
        try:
            requests = read_warmup_file(self.path)
            for request in requests:
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                self.run(inputs, request.model_spec.signature_name, tuple(request.output_filter))
        except Exception as err:
            raise ServableError(f"warmup of {self.name} version {self.version} failed: {err}") from err
        return len(requests)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.session.close()

