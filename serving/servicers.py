"""TF Serving's PredictionService (Predict, GetModelMetadata) and ModelService (GetModelStatus) over the
model registry: each call's cost bounded before any work (`serving.decode`, `serving.limits`), its
model version resolved as TF Serving resolves it (number, label or latest), then run in row slices.
"""

from __future__ import annotations

import grpc
import tensorflow as tf
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.apis.status_pb2 import StatusProto

from serving.contract import (
    PREDICTION_SERVICE,
    SIGNATURE_KEY,
)
from serving.decode import BadRequest, decode_inputs
from serving.limits import LIMITS_METADATA_FIELD, InFlightGate, RequestLimits
from serving.pseudonym import PRIVACY_METADATA_FIELD
from serving.registry import ModelRegistry, UnknownLabelError
from serving.servable import ServableError
from serving.slicing import DeadlinePassed, run_sliced

METADATA_FIELDS = {"signature_def", LIMITS_METADATA_FIELD, PRIVACY_METADATA_FIELD}


def _requested_version(model_spec) -> tuple[int | None, str]:
    """ModelSpec's version choice: (version, "") or (None, version_label) or (None, "")."""
    return (model_spec.version.value if model_spec.HasField("version") else None), model_spec.version_label


def _lookup_code(err: KeyError) -> grpc.StatusCode:
    return grpc.StatusCode.INVALID_ARGUMENT if isinstance(err, UnknownLabelError) else grpc.StatusCode.NOT_FOUND


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict within `limits`: a call past its deadline or over the concurrency cap is answered
    before any work; while the cap is full, `health` says NOT_SERVING for the prediction service."""

    def __init__(self, registry: ModelRegistry, limits: RequestLimits,
                 health_servicer: health.HealthServicer | None = None):
        if limits.max_concurrent_predicts is None:
            raise ValueError("PredictionServicer needs a number for max_concurrent_predicts")
        self.registry = registry
        self.limits = limits
        self.gate = InFlightGate(limits.max_concurrent_predicts, self._on_full)
        self.health = health_servicer

    def _on_full(self, full: bool) -> None:
        if self.health is not None:  # the overall status ("") too: a load balancer asks for either
            status = health_pb2.HealthCheckResponse.NOT_SERVING if full else health_pb2.HealthCheckResponse.SERVING
            for service in ("", PREDICTION_SERVICE):
                self.health.set(service, status)

    def Predict(self, request, context):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before it started")
        if not self.gate.try_enter():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the server is running its maximum of {self.gate.capacity} Predict calls; retry later")
        try:
            held = self.registry.acquire(request.model_spec.name, *_requested_version(request.model_spec))
            with held as servable:
                return self._predict(servable, request, context)
        except KeyError as err:
            context.abort(_lookup_code(err), str(err.args[0]))
        finally:
            self.gate.leave()

    def _predict(self, servable, request, context):
        signature_name = request.model_spec.signature_name or SIGNATURE_KEY
        try:
            in_infos, _ = servable.signature(signature_name)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"signature {signature_name!r} not found in model {servable.name!r}; "
                          f"signatures: {sorted(servable.signatures)}")
        try:
            inputs = decode_inputs(request.inputs, in_infos, self.limits)
        except BadRequest as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        try:
            outputs = run_sliced(servable, inputs, signature_name, tuple(request.output_filter),
                                 self.limits.max_rows_per_run, context.time_remaining)
        except (DeadlinePassed, tf.errors.DeadlineExceededError):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed while it ran")
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
        try:
            servable = self.registry.get(request.model_spec.name, *_requested_version(request.model_spec))
        except KeyError as err:
            context.abort(_lookup_code(err), str(err.args[0]))
        fields = list(request.metadata_field)
        if not fields or set(fields) - METADATA_FIELDS or len(set(fields)) != len(fields):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"metadata_field must list some of {sorted(METADATA_FIELDS)}, each once; got {fields}")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        if "signature_def" in fields:
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for key, sig in servable.signature_def_map().items():
                sig_map.signature_def[key].CopyFrom(sig)
            response.metadata["signature_def"].Pack(sig_map)
        if LIMITS_METADATA_FIELD in fields:  # the embedded server's own: TF Serving has no such field
            response.metadata[LIMITS_METADATA_FIELD].Pack(self.limits.as_struct())
        # The embedded server's own too: which inputs the model takes as pseudonyms, under which key id
        # (assets.extra/adrec.json). Left out for a model exported without it: the client then cannot check.
        if PRIVACY_METADATA_FIELD in fields and "privacy" in servable.metadata:
            privacy = struct_pb2.Struct()
            privacy.update(servable.metadata["privacy"])
            response.metadata[PRIVACY_METADATA_FIELD].Pack(privacy)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def GetModelStatus(self, request, context):
        try:
            states = self.registry.version_states(request.model_spec.name)
            wanted = self.registry.resolve_version(request.model_spec.name, *_requested_version(request.model_spec))
        except KeyError as err:
            context.abort(_lookup_code(err), str(err.args[0]))
        if wanted is not None:
            if wanted not in states:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"model {request.model_spec.name!r} has no version {wanted}; "
                              f"known versions: {sorted(states)}")
            states = {wanted: states[wanted]}
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in sorted(states, reverse=True):
            status = response.model_version_status.add()
            status.version = version
            status.state = get_model_status_pb2.ModelVersionStatus.State.Value(states[version].state)
            status.status.CopyFrom(StatusProto(error_code=2 if states[version].error else 0,
                                               error_message=states[version].error))
        return response
