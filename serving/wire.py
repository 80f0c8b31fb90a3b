"""TF Serving's gRPC messages without TensorFlow: the client's side of the wire.

The message types come from the `.proto` files vendored in serving/protos/, compiled at build time
into a FileDescriptorSet (serving/protoc.py) and loaded here into a descriptor pool of our own:
the same `tensorflow.serving.*` / `tensorflow.*` messages TF Serving speaks, which never clash
with TensorFlow's generated modules when both live in one process (the embedded server and its
tests). Tensors go to and from numpy here too, in place of `tf.make_tensor_proto` / `tf.make_ndarray`.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from serving.contract import MODEL_SERVICE, PREDICTION_SERVICE
from serving.values import number

HEALTH_SERVICE = "grpc.health.v1.Health"


def _descriptor_set() -> bytes:
    try:
        from serving._proto.descriptor_set import FILE_DESCRIPTOR_SET
        return FILE_DESCRIPTOR_SET
    except ImportError:
        pass
    try:  # a checkout used without installing it: compile now (grpcio-tools, in the dev extra)
        from serving import protoc
        return protoc.compile_descriptor_set()
    except ImportError as err:
        raise ImportError("serving/_proto/ is generated from serving/protos/ when adrec is installed "
                          "(pip install ., make setup); a checkout used without installing it needs "
                          "grpcio-tools (dev extra) to compile them on import, or once with "
                          "`python -m serving.protoc`") from err


DESCRIPTOR_SET = _descriptor_set()
POOL = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET).file:  # imports come first
    POOL.AddSerializedFile(_file.SerializeToString())


def _message(full_name: str):
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


TensorProto = _message("tensorflow.TensorProto")
PredictRequest = _message("tensorflow.serving.PredictRequest")
PredictResponse = _message("tensorflow.serving.PredictResponse")
GetModelMetadataRequest = _message("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = _message("tensorflow.serving.GetModelMetadataResponse")
SignatureDefMap = _message("tensorflow.serving.SignatureDefMap")
GetModelStatusRequest = _message("tensorflow.serving.GetModelStatusRequest")
GetModelStatusResponse = _message("tensorflow.serving.GetModelStatusResponse")
HealthCheckRequest = _message("grpc.health.v1.HealthCheckRequest")
HealthCheckResponse = _message("grpc.health.v1.HealthCheckResponse")

_RPCS = {  # method: (service, request, response)
    "Predict": (PREDICTION_SERVICE, PredictRequest, PredictResponse),
    "GetModelMetadata": (PREDICTION_SERVICE, GetModelMetadataRequest, GetModelMetadataResponse),
    "GetModelStatus": (MODEL_SERVICE, GetModelStatusRequest, GetModelStatusResponse),
    "Check": (HEALTH_SERVICE, HealthCheckRequest, HealthCheckResponse),
}


def stubs(channel: grpc.Channel) -> dict[str, grpc.UnaryUnaryMultiCallable]:
    """Callables for the client's RPCs on `channel`, by method name."""
    return {method: channel.unary_unary(f"/{service}/{method}", request_serializer=request.SerializeToString,
                                        response_deserializer=response.FromString)
            for method, (service, request, response) in _RPCS.items()}


def enum_name(message, field: str, number: int) -> str:
    """The name of an enum field's value, e.g. a health status or a model version state."""
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[number].name


# TensorFlow's DataType values the client converts: TF dtype name -> (enum name, numpy dtype, value field).
_DTYPES = {
    "float32": ("DT_FLOAT", np.float32, "float_val"),
    "float64": ("DT_DOUBLE", np.float64, "double_val"),
    "int8": ("DT_INT8", np.int8, "int_val"),
    "int16": ("DT_INT16", np.int16, "int_val"),
    "int32": ("DT_INT32", np.int32, "int_val"),
    "int64": ("DT_INT64", np.int64, "int64_val"),
    "uint8": ("DT_UINT8", np.uint8, "int_val"),
    "bool": ("DT_BOOL", np.bool_, "bool_val"),
    "string": ("DT_STRING", np.object_, "string_val"),
}
_DATA_TYPE = POOL.FindEnumTypeByName("tensorflow.DataType")
_BY_NUMBER = {_DATA_TYPE.values_by_name[enum].number: name for name, (enum, _, _) in _DTYPES.items()}


def dtype_name(number: int) -> str:
    """The TF dtype name ("string", "int64", ...) of a DataType enum value; types this client does not
    convert keep their enum name ("DT_HALF")."""
    if number in _BY_NUMBER:
        return _BY_NUMBER[number]
    value = _DATA_TYPE.values_by_number.get(number)
    return value.name if value else f"DataType {number}"


def numpy_dtype(name: str) -> np.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name} is not supported by this client (it converts {sorted(_DTYPES)})")
    return np.dtype(_DTYPES[name][1])


def _infer(array: np.ndarray) -> str:
    if array.dtype.kind in "OUS":
        return "string"
    if array.dtype.name not in _DTYPES:
        raise ValueError(f"cannot send numpy {array.dtype} values; convert them to one of {sorted(_DTYPES)}")
    return array.dtype.name


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"expected strings, got {type(value).__name__} {value!r}")


def _numeric(values, dtype: np.dtype) -> np.ndarray:
    """`values` as `dtype`, refusing what would silently change them (23.5 -> 23, 2**40 -> int32,
    1e300 -> float32 inf, True -> 1) and numbers that are not finite."""
    array = np.asarray(values)
    if array.dtype.kind in "OUS":  # Python objects or text: each value on its own ("20" is 20, "twenty" no)
        flat = [number(v, dtype) for v in array.reshape(-1)]
        return np.array(flat, dtype=dtype).reshape(array.shape)
    if (array.dtype.kind == "b") != (dtype.kind == "b"):
        raise ValueError(f"{array.dtype} values cannot be sent as {dtype}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise ValueError(f"values that are not finite (inf, nan) cannot be sent as {dtype}")
    if dtype.kind in "iu" and array.size and array.dtype.kind in "iuf":
        if array.dtype.kind == "f" and not np.all(array == np.trunc(array)):
            raise ValueError(f"{array.dtype} values that are not whole numbers cannot be sent as {dtype}")
        info, low, high = np.iinfo(dtype), array.min(), array.max()
        if array.dtype.kind == "f":  # 2**63 is a float, int64's max is not
            outside = float(low) < float(info.min) or float(high) >= float(int(info.max) + 1)
        else:
            outside = int(low) < info.min or int(high) > info.max
        if outside:
            raise ValueError(f"values outside the range of {dtype}")
    with np.errstate(over="ignore"):  # an overflow is refused just below
        out = array.astype(dtype, copy=False)
    if dtype.kind == "f" and not np.all(np.isfinite(out)):
        raise ValueError(f"values beyond the range of {dtype}")
    return out


def make_tensor_proto(values, dtype: str | None = None):
    """A TensorProto of `values` (an array-like, nested lists for more dimensions); `dtype` a TF dtype
    name ("string", "int64", ...), else taken from numpy's. Strings go as UTF-8 bytes."""
    if dtype is None:
        dtype = _infer(np.asarray(values) if not isinstance(values, np.ndarray) else values)
    enum, np_type, _ = _DTYPES.get(dtype) or (None, None, None)
    if enum is None:
        raise ValueError(f"dtype {dtype} is not supported by this client (it converts {sorted(_DTYPES)})")
    proto = TensorProto(dtype=_DATA_TYPE.values_by_name[enum].number)
    if dtype == "string":
        array = np.asarray(values, dtype=object)
        proto.string_val.extend(_as_bytes(v) for v in array.reshape(-1))
    else:
        array = _numeric(values, np.dtype(np_type))
        proto.tensor_content = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def make_ndarray(proto) -> np.ndarray:
    """The numpy array of a TensorProto (strings as bytes in an object array), as `tf.make_ndarray`
    reads it: packed `tensor_content`, or the typed values, the last one repeated to fill the shape."""
    name = dtype_name(proto.dtype)
    if name not in _DTYPES:
        raise ValueError(f"cannot convert a tensor of {name}: this client converts {sorted(_DTYPES)}")
    shape = [d.size for d in proto.tensor_shape.dim]
    count = math.prod(shape)
    dtype = numpy_dtype(name)
    if name != "string" and proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    values = list(getattr(proto, _DTYPES[name][2]))
    if len(values) < count:
        values += [values[-1] if values else (b"" if name == "string" else 0)] * (count - len(values))
    out = np.empty(count, dtype=dtype) if name == "string" else np.array(values[:count], dtype=dtype)
    if name == "string":
        out[:] = values[:count]
    return out.reshape(shape)
