"""What the embedded server lets one request cost, and how many run at once.

`RequestLimits` bounds a Predict request before any of it is decoded or run (serving/decode.py
checks them) and how many of its rows one model run takes (serving/slicing.py); `InFlightGate`
bounds how many Predict calls run at once and answers the next one at once instead of queueing
it, flipping the gRPC health status while it is full.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from google.protobuf import struct_pb2

from serving.config import ModelConfigError
from serving.contract import (
    MAX_EXCLUDED_AD_IDS,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_ELEMENTS,
    MAX_ROWS_PER_RUN,
    SERVER_MAX_BATCH_SIZE,
)

LIMITS_METADATA_FIELD = "request_limits"  # GetModelMetadata's metadata_field for them (a Struct)


@dataclass(frozen=True)
class RequestLimits:
    max_batch_size: int = SERVER_MAX_BATCH_SIZE  # rows of one request; 0: no limit
    max_excluded_ad_ids: int = MAX_EXCLUDED_AD_IDS  # the width of the recommender's excluded_ad_ids
    max_request_elements: int = MAX_REQUEST_ELEMENTS  # values of all inputs together
    max_request_bytes: int = MAX_REQUEST_BYTES  # numeric values x their size, + strings as sent
    max_concurrent_predicts: int | None = None  # at once, one more refused; None: one per request thread
    max_rows_per_run: int = MAX_ROWS_PER_RUN  # rows per model run: larger requests run in slices (serving/slicing.py)

    def __post_init__(self):
        for name, value in asdict(self).items():  # named as the server's flags are
            least = 0 if name == "max_batch_size" else 1
            if value is None and name == "max_concurrent_predicts":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ModelConfigError(f"--{name.replace('_', '-')}: expected an integer >= {least}, got {value!r}")

    def as_struct(self) -> struct_pb2.Struct:
        """The limits as a `google.protobuf.Struct`, what GetModelMetadata returns for them."""
        struct = struct_pb2.Struct()
        struct.update(asdict(self))
        return struct


DEFAULT_LIMITS = RequestLimits()


def limits_from_args(args) -> RequestLimits:
    """The limits `add_arguments`' flags set."""
    return RequestLimits(**{f.name: getattr(args, f.name) for f in fields(RequestLimits)})


class InFlightGate:
    """At most `capacity` holders at once; `try_enter` never waits. `on_change(full)` is called on
    every change between full and not full, under the gate's lock, so the calls keep their order."""

    def __init__(self, capacity: int, on_change: Callable[[bool], None] = lambda full: None):
        self.capacity = capacity
        self._on_change = on_change
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def try_enter(self) -> bool:
        with self._lock:
            if self._in_flight >= self.capacity:
                return False
            self._in_flight += 1
            if self._in_flight == self.capacity:
                self._on_change(True)
            return True

    def leave(self) -> None:
        with self._lock:
            if self._in_flight == self.capacity:
                self._on_change(False)
            self._in_flight -= 1
