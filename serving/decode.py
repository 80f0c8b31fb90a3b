"""A Predict request's inputs, checked against the signature and the server's limits, then decoded.

Everything about a TensorProto that decides what decoding costs is checked first, on the proto:
its dtype, its declared shape against the signature, the values it carries against the values its
shape declares, and the request's total elements and bytes. Only then is anything decoded, so a
request costs what it carries, within the limits, never what a few bytes declare.

A tensor must carry exactly the values its shape declares: TensorFlow Serving fills a shape from a
single value (or a short list, repeating its last value), which lets a few bytes declare
millions of values; that guess at what the caller meant is refused here.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from serving.contract import EXCLUDED_AD_IDS
from serving.limits import RequestLimits

# The TensorProto field each dtype's values travel in, when not packed in `tensor_content`.
VALUE_FIELDS = {tf.string: "string_val", tf.float32: "float_val", tf.float64: "double_val",
                tf.int64: "int64_val", tf.int32: "int_val", tf.int16: "int_val", tf.int8: "int_val",
                tf.uint8: "int_val", tf.uint16: "int_val", tf.uint32: "uint32_val", tf.uint64: "uint64_val",
                tf.bool: "bool_val", tf.float16: "half_val", tf.bfloat16: "half_val"}
_HEADER_FIELDS = {"dtype", "tensor_shape", "version_number"}


class BadRequest(ValueError):
    """A request the server refuses before running it (INVALID_ARGUMENT); the message names the input."""


def _shape_text(shape) -> list:
    return ["?" if d is None else d for d in shape]


def _check_dtype(key: str, proto, expected: tf.dtypes.DType) -> None:
    try:
        got = tf.dtypes.as_dtype(proto.dtype) if proto.dtype else None
    except TypeError:  # an enum value TensorFlow does not know
        got = None
    if got != expected:
        name = got.name if got else (f"enum {proto.dtype}" if proto.dtype else "unset")
        raise BadRequest(f"input {key!r} has dtype {name}, expected {expected.name}")
    if expected not in VALUE_FIELDS:
        raise BadRequest(f"input {key!r} has dtype {expected.name}, which a request cannot carry here")


def _check_shape(key: str, dims: list[int], expected, limits: RequestLimits) -> None:
    """The declared shape against the limits and the signature's shape."""
    if any(d < 0 for d in dims):
        raise BadRequest(f"input {key!r} declares a negative dimension: {dims}")
    if limits.max_batch_size and dims and dims[0] > limits.max_batch_size:
        raise BadRequest(f"batch size {dims[0]} exceeds the server's max batch size {limits.max_batch_size}; "
                         "split the request")
    if expected is not None and (len(dims) != len(expected) or any(
            want is not None and want != have for want, have in zip(expected, dims, strict=True))):
        raise BadRequest(f"input {key!r} has shape {dims}, expected {_shape_text(expected)}")
    if key == EXCLUDED_AD_IDS and len(dims) == 2 and dims[1] > limits.max_excluded_ad_ids:
        raise BadRequest(f"input {key!r} lists {dims[1]} ad ids per request, more than the server's "
                         f"{limits.max_excluded_ad_ids}")
    if math.prod(dims) > limits.max_request_elements:
        raise BadRequest(f"input {key!r} declares {math.prod(dims)} elements, more than the server's "
                         f"{limits.max_request_elements} per request")


def _carried_bytes(key: str, proto, dtype: tf.dtypes.DType, elements: int) -> int:
    """Check that the proto carries exactly the `elements` values its shape declares, in the one
    field its dtype reads; returns their size (strings: as sent, with their framing)."""
    field = VALUE_FIELDS[dtype]
    present = {f.name for f, _ in proto.ListFields()} - _HEADER_FIELDS
    stray = sorted(present - {field, "tensor_content"})
    if stray or present == {field, "tensor_content"}:
        extra = stray or ["tensor_content"]
        raise BadRequest(f"input {key!r} ({dtype.name}) carries {', '.join(extra)}; its values belong in "
                         f"{field}{'' if dtype == tf.string else ' or tensor_content'} alone")
    if "tensor_content" in present:
        if dtype == tf.string:
            raise BadRequest(f"input {key!r}: a string tensor carries its values in string_val, not tensor_content")
        if len(proto.tensor_content) != elements * dtype.size:
            raise BadRequest(f"input {key!r} carries {len(proto.tensor_content)} bytes of tensor_content; its "
                             f"declared shape needs {elements * dtype.size} ({elements} x {dtype.size})")
        return len(proto.tensor_content)
    carried = len(getattr(proto, field))
    if carried != elements:
        raise BadRequest(f"input {key!r} declares {elements} values but carries {carried} in {field}; send "
                         "every value (one value is not repeated to fill the shape)")
    return proto.ByteSize() if dtype == tf.string else elements * dtype.size


def check_request(inputs, in_infos: dict, limits: RequestLimits) -> None:
    """Every check that needs no decoding, on all inputs, before any is decoded. `inputs`: the
    request's input name -> TensorProto map; `in_infos`: the signature's (serving/servable.py)."""
    elements = size = 0
    batches = set()
    for key, proto in inputs.items():
        if key not in in_infos:
            raise BadRequest(f"unknown input {key!r}; the signature takes {sorted(in_infos)}")
        _check_dtype(key, proto, in_infos[key].dtype)
        dims = [d.size for d in proto.tensor_shape.dim]
        _check_shape(key, dims, in_infos[key].shape, limits)
        size += _carried_bytes(key, proto, in_infos[key].dtype, math.prod(dims))
        elements += math.prod(dims)
        if dims:
            batches.add(dims[0])
    missing = sorted(set(in_infos) - set(inputs))
    if missing:
        raise BadRequest(f"missing input(s) {missing}")
    if len(batches) > 1:
        raise BadRequest(f"inputs disagree on batch size: {sorted(batches)}")
    if elements > limits.max_request_elements:
        raise BadRequest(f"the request carries {elements} elements in all, more than the server's "
                         f"{limits.max_request_elements}; split it")
    if size > limits.max_request_bytes:
        raise BadRequest(f"the request carries {size} bytes of values in all, more than the server's "
                         f"{limits.max_request_bytes}; split it")


def decode_inputs(inputs, in_infos: dict, limits: RequestLimits) -> dict[str, np.ndarray]:
    """`check_request`, then each input as a numpy array of exactly its declared shape."""
    check_request(inputs, in_infos, limits)
    arrays = {}
    for key, proto in inputs.items():
        try:
            arrays[key] = tf.make_ndarray(proto)
        except Exception as err:  # values a dtype cannot hold (an int_val out of int8's range, ...)
            raise BadRequest(f"input {key!r} is not a valid tensor: {err}") from err
    return arrays
