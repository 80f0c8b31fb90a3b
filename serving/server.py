"""An embedded model server speaking TensorFlow Serving's gRPC API.

PredictionService (Predict, GetModelMetadata) and ModelService (GetModelStatus) over
SavedModels loaded the TF1 way, as `tensorflow_model_server` does. It is for local runs
and tests; production runs the real `tensorflow/serving` image on the same artifacts.

Run: `python -m serving.server --model recommender=runs/demo/models/recommender ...`
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from serving.binding import SO_REUSEPORT_OFF, TlsConfig, TlsError, bind, check_port, port_number
from serving.config import ModelConfigError, ModelEntry, read_model_config
from serving.contract import (
    HEALTH_SERVICES,
    MAX_EXCLUDED_AD_IDS,
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_ELEMENTS,
    MAX_ROWS_PER_RUN,
)
from serving.contract import SERVER_MAX_BATCH_SIZE as DEFAULT_MAX_BATCH_SIZE
from serving.limits import DEFAULT_LIMITS, RequestLimits, limits_from_args
from serving.registry import ModelRegistry
from serving.servable import ServableError
from serving.servicers import ModelServicer, PredictionServicer
from serving.versions import scan_versions

LOOPBACK = "127.0.0.1"
SPARE_THREADS = 2  # beyond --max-workers: health, status and refusals never wait behind running Predicts

class EmbeddedModelServer:
    """Serve models on host:port (loopback unless told otherwise); port 0 picks a free port.

    `base_paths` maps each name to its base path (latest version) or to a `ModelEntry` from
    `models.config` (version policy and labels). `poll_seconds` > 0 watches the base paths and
    swaps in new versions without failing a request; `tls` serves over TLS; requests over
    `max_message_bytes` are refused by gRPC (RESOURCE_EXHAUSTED) and batches over `max_batch_size`
    with INVALID_ARGUMENT; `limits` bounds the rest of a request's cost (its `max_batch_size` is
    replaced by the argument). The port is this server's alone (never shared through SO_REUSEPORT);
    a taken port and bad TLS files fail before any model loads, naming the port or the files.
    """

    def __init__(self, base_paths: Mapping[str, Path | ModelEntry], host: str = LOOPBACK, port: int = 0,
                 max_workers: int = 8, poll_seconds: float = 0.0, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, tls: TlsConfig | None = None, warmup: bool = True,
                 limits: RequestLimits = DEFAULT_LIMITS):
        concurrent = limits.max_concurrent_predicts or max_workers
        if concurrent > max_workers:
            raise ModelConfigError(f"--max-concurrent-predicts {concurrent} is more than --max-workers {max_workers}")
        check_port(host, port)
        credentials = tls.credentials() if tls else None
        self.registry = ModelRegistry(base_paths, warmup=warmup)
        self.host = host
        self.poll_seconds = poll_seconds
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), SO_REUSEPORT_OFF]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers + SPARE_THREADS,
                                                              thread_name_prefix="adrec-rpc"), options=options)
        try:
            self.port = bind(self._server, host, port, credentials)
        except OSError:
            self.registry.close()
            raise
        self.health = health.HealthServicer()
        limits = replace(limits, max_batch_size=max_batch_size, max_concurrent_predicts=concurrent)
        self.predictions = PredictionServicer(self.registry, limits, self.health)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self.predictions, self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.registry), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedModelServer:
        self._server.start()
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.registry.start_polling(self.poll_seconds)
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.registry.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def discover_models(model_base: Path) -> dict[str, Path]:
    """Every subdirectory of `model_base` holding version directories is a model."""
    return {p.name: p for p in sorted(Path(model_base).iterdir()) if p.is_dir() and scan_versions(p)[0]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags (shared with `adrec serve`); names follow tensorflow_model_server's."""
    parser.add_argument("--model-config-file", type=Path,
                        help="ModelServerConfig text proto (models.config, as written by export)")
    parser.add_argument("--models-root", type=Path,
                        help="where /models/<name> base paths of the config live (default: the config's dir)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=BASE_PATH",
                        help="a model name and its base path (repeatable)")
    parser.add_argument("--model-base", type=Path,
                        help="serve every model directory found under this path")
    parser.add_argument("--host", default=LOOPBACK, help="bind address (default: loopback only)")
    parser.add_argument("--port", type=port_number, default=8500, help="1..65535; 0: any free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    parser.add_argument("--file-system-poll-wait-seconds", type=float, default=1.0,
                        help="poll base paths for new versions this often (0: never)")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="refuse larger batches with INVALID_ARGUMENT (0: no limit)")
    parser.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                        help="largest request accepted (gRPC answers RESOURCE_EXHAUSTED above it)")
    parser.add_argument("--ssl-cert", type=Path, help="server certificate (PEM); with --ssl-key serves TLS")
    parser.add_argument("--ssl-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--no-warmup", action="store_true", help="do not replay warmup requests on load")
    parser.add_argument("--lifetime", type=float, default=None,
                        help="stop by itself after this many seconds (tests and demos)")
    parser.add_argument("--max-workers", type=int, default=8, help="request thread pool size")
    parser.add_argument("--max-excluded-ad-ids", type=int, default=MAX_EXCLUDED_AD_IDS,
                        help="refuse a wider excluded_ad_ids with INVALID_ARGUMENT")
    parser.add_argument("--max-request-elements", type=int, default=MAX_REQUEST_ELEMENTS,
                        help="refuse a request carrying more values, all inputs together, with INVALID_ARGUMENT")
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                        help="refuse a request whose values take more bytes with INVALID_ARGUMENT")
    parser.add_argument("--max-concurrent-predicts", type=int, default=None,
                        help="Predict calls run at once; one more gets RESOURCE_EXHAUSTED at once and health "
                             "says NOT_SERVING while that many run (default and most: --max-workers)")
    parser.add_argument("--max-rows-per-run", type=int, default=MAX_ROWS_PER_RUN,
                        help="run a larger request's rows through the model in slices of this many, sharing the "
                             "cores with other calls between slices and stopping at the call's deadline")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def models_from_args(args) -> dict[str, Path | ModelEntry]:
    models: dict[str, Path | ModelEntry] = {}
    if args.model_config_file:
        models.update({e.name: e for e in read_model_config(args.model_config_file, args.models_root)})
    if args.model_base:
        models.update(discover_models(args.model_base))
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ModelConfigError(f"--model expects NAME=BASE_PATH, got {spec!r}")
        models[name] = Path(path)
    if not models:
        raise ModelConfigError("no models to serve (use --model-config-file, --model NAME=PATH or --model-base DIR)")
    return models


def main(argv=None) -> int:
    return run(parse_args(argv))


def run(args) -> int:
    """Serve until SIGTERM/SIGINT or `--lifetime`; `args` as `add_arguments` defines them."""
    logging.basicConfig(level=logging.INFO, format="[adrec-serve %(asctime)s] %(levelname)s %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # its loader logs every restore twice otherwise
    if bool(args.ssl_cert) != bool(args.ssl_key):
        print("error: --ssl-cert and --ssl-key go together", file=sys.stderr)
        return 2
    try:
        models = models_from_args(args)
        tls = TlsConfig(args.ssl_cert, args.ssl_key) if args.ssl_cert else None
        server = EmbeddedModelServer(models, args.host, args.port, args.max_workers,
                                     poll_seconds=args.file_system_poll_wait_seconds,
                                     max_batch_size=args.max_batch_size, max_message_bytes=args.max_message_bytes,
                                     tls=tls, warmup=not args.no_warmup, limits=limits_from_args(args)).start()
    except (ModelConfigError, TlsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ServableError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    versions = ", ".join(f"{n} v{','.join(map(str, server.registry.loaded_versions(n)))}"
                         for n in server.registry.base_paths)
    print(f"serving {versions} on {server.address} ({'TLS' if tls else 'plaintext'}, pid {os.getpid()})",
          flush=True)
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
    print(f"stopped (pid {os.getpid()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
