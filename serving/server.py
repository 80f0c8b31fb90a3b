"""An embedded model server speaking TensorFlow Serving's gRPC API.

PredictionService (Predict, GetModelMetadata) and ModelService (GetModelStatus) over
SavedModels loaded the TF1 way, as `tensorflow_model_server` does. It is for local runs
and tests; production runs the real `tensorflow/serving` image on the same artifacts.

Run: `python -m serving.server --model recommender=runs/demo/models/recommender ...`
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.apis.status_pb2 import StatusProto

from serving.servable import Servable, ServableError, load_latest

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
LOOPBACK = "127.0.0.1"


class ModelRegistry:
    """Name -> the loaded (latest) version of each configured model."""

    def __init__(self, base_paths: dict[str, Path]):
        self.base_paths = {k: Path(v) for k, v in base_paths.items()}
        self._servables: dict[str, Servable] = {}
        for name, path in self.base_paths.items():
            self._servables[name] = load_latest(name, path)

    def get(self, name: str, version: int | None = None) -> Servable:
        servable = self._servables.get(name)
        if servable is None:
            raise KeyError(f"model {name!r} is not served; served models: {sorted(self._servables)}")
        if version is not None and version != servable.version:
            raise KeyError(f"model {name!r} version {version} is not loaded "
                           f"(loaded version: {servable.version})")
        return servable

    def all(self) -> dict[str, Servable]:
        return dict(self._servables)

    def close(self) -> None:
        for s in self._servables.values():
            s.close()


def _requested_version(model_spec) -> int | None:
    return model_spec.version.value if model_spec.HasField("version") else None


def _lookup(registry: ModelRegistry, model_spec, context) -> Servable:
    try:
        return registry.get(model_spec.name, _requested_version(model_spec))
    except KeyError as err:
        context.abort(grpc.StatusCode.NOT_FOUND, str(err.args[0]))


def _decode_inputs(request, in_infos, context) -> dict[str, np.ndarray]:
    arrays = {}
    for key, proto in request.inputs.items():
        if key not in in_infos:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown input {key!r}; the signature takes {sorted(in_infos)}")
        expected = in_infos[key].dtype
        got = tf.dtypes.as_dtype(proto.dtype) if proto.dtype else None
        if got != expected:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"input {key!r} has dtype {got.name if got else 'unset'}, expected {expected.name}")
        try:
            arrays[key] = tf.make_ndarray(proto)
        except Exception as err:  # malformed TensorProto
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {key!r} is not a valid tensor: {err}")
        shape = in_infos[key].shape
        if shape is not None and (arrays[key].ndim != len(shape) or any(
                want is not None and want != have for want, have in zip(shape, arrays[key].shape, strict=True))):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"input {key!r} has shape {list(arrays[key].shape)}, expected "
                          f"{['?' if d is None else d for d in shape]}")
    missing = sorted(set(in_infos) - set(arrays))
    if missing:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"missing input(s) {missing}")
    batch = {len(a) for a in arrays.values() if a.ndim > 0}
    if len(batch) > 1:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"inputs disagree on batch size: {sorted(batch)}")
    return arrays


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def Predict(self, request, context):
        servable = _lookup(self.registry, request.model_spec, context)
        signature_name = request.model_spec.signature_name or "serving_default"
        try:
            in_infos, _ = servable.signature(signature_name)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"signature {signature_name!r} not found in model {servable.name!r}; "
                          f"signatures: {sorted(servable.signatures)}")
        inputs = _decode_inputs(request, in_infos, context)
        try:
            outputs = servable.run(inputs, signature_name, tuple(request.output_filter))
        except ServableError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except tf.errors.InvalidArgumentError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature_name
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):
        servable = _lookup(self.registry, request.model_spec, context)
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"metadata_field must be ['signature_def'], got {fields}")
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in servable.signature_def_map().items():
            sig_map.signature_def[key].CopyFrom(sig)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(sig_map)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def GetModelStatus(self, request, context):
        servable = _lookup(self.registry, request.model_spec, context)
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = servable.version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        status.status.CopyFrom(StatusProto())
        return response


class EmbeddedModelServer:
    """Serve models on host:port (loopback unless told otherwise); port 0 picks a free port."""

    def __init__(self, base_paths: dict[str, Path], host: str = LOOPBACK, port: int = 0,
                 max_workers: int = 8):
        self.registry = ModelRegistry(base_paths)
        self.host = host
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.registry), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.registry), self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedModelServer:
        self._server.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()
        self.registry.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def discover_models(model_base: Path) -> dict[str, Path]:
    """Every subdirectory of `model_base` holding numeric version directories is a model."""
    return {p.name: p for p in sorted(Path(model_base).iterdir())
            if p.is_dir() and any(c.is_dir() and c.name.isdigit() for c in p.iterdir())}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=BASE_PATH",
                        help="a model name and its base path (repeatable)")
    parser.add_argument("--model-base", type=Path,
                        help="serve every model directory found under this path")
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    parser.add_argument("--lifetime", type=float, default=None,
                        help="stop by itself after this many seconds (tests and demos)")
    parser.add_argument("--max-workers", type=int, default=8)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    models = discover_models(args.model_base) if args.model_base else {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep:
            print(f"error: --model expects NAME=BASE_PATH, got {spec!r}", file=sys.stderr)
            return 2
        models[name] = Path(path)
    if not models:
        print("error: no models to serve (use --model NAME=PATH or --model-base DIR)", file=sys.stderr)
        return 2
    try:
        server = EmbeddedModelServer(models, args.host, args.port, args.max_workers).start()
    except (ServableError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    versions = ", ".join(f"{n} v{s.version}" for n, s in server.registry.all().items())
    print(f"serving {versions} on {server.address} (pid {os.getpid()})", flush=True)
    if args.port_file:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(server.port))
        os.replace(tmp, args.port_file)
    deadline = None if args.lifetime is None else time.monotonic() + args.lifetime
    while not stop.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            print("lifetime reached, stopping", flush=True)
            break
        stop.wait(0.2)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
